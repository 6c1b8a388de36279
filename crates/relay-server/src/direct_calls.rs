//! Stateless `tools/call` requests answered without rmcp's per-request service.
//!
//! On the 2026-07-28 protocol every request stands alone, and rmcp serves each one by
//! building a whole MCP service for it (a task, channels, cancellation tokens, a peer) and
//! re-serializing the request to check its headers: three quarters of the server's CPU in a
//! `list_peers` call. A request that is plainly well-formed, by checks each at least as strict
//! as rmcp's, is parsed once here and answered by the same tool code ([`RelayTools::call`]),
//! in the reply rmcp would give. Everything else — other methods, sessions, older protocol
//! versions, and every request that rmcp would refuse or answer with an error of its own
//! wording — goes to rmcp untouched. `direct_tool_calls = false` in the config sends all of
//! it there.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use rmcp::model::{JsonObject, ProtocolVersion, RequestId, RequestMetaObject, ServerJsonRpcMessage, ServerResult};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde::Deserialize;

use crate::Relay;
use crate::mcp::{Credentials, RelayTools, ToolCall};
use crate::sessions::BoundedSessions;

pub type McpService = StreamableHttpService<RelayTools, BoundedSessions>;

const JSON: &str = "application/json";
const EVENT_STREAM: &str = "text/event-stream";

/// Serves `/mcp`: directly when `direct` is set and the request qualifies, else through rmcp.
pub async fn serve_mcp(direct: Option<&DirectCalls>, mcp: &McpService, request: Request) -> Response {
    match direct {
        Some(direct) if direct.qualifies(request.method(), request.headers()) => direct.read_and_answer(mcp, request).await,
        _ => mcp.handle(request).await.into_response(),
    }
}

pub struct DirectCalls {
    /// With no session ever: requests naming one go to rmcp.
    tools: RelayTools,
    max_body: usize,
}

/// A `tools/call` request, exactly: no field rmcp would read that this does not.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    jsonrpc: String,
    id: RequestId,
    method: String,
    params: Params,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    name: String,
    arguments: JsonObject,
    #[serde(rename = "_meta")]
    meta: JsonObject,
}

impl DirectCalls {
    /// `None` when rmcp is set up to check what is not checked here (its own Host or Origin
    /// lists, required protocol metadata) or to answer in event streams.
    pub fn new(relay: Arc<Relay>, mcp: &StreamableHttpServerConfig) -> Option<Self> {
        let mirrored = mcp.json_response
            && !mcp.stateless_protocol_metadata_required
            && mcp.allowed_hosts.is_empty()
            && mcp.allowed_origins.is_empty();
        mirrored.then(|| Self { tools: RelayTools::new(relay), max_body: mcp.max_request_body_bytes })
    }

    /// What the request's head must say; the body is checked in [`Self::answer`].
    fn qualifies(&self, method: &Method, headers: &HeaderMap) -> bool {
        let stateless = modern_version(headers) && !headers.contains_key("mcp-session-id");
        // rmcp parses Host even when it checks no list (a malformed one is a 400 there), and
        // checks Origin only when configured to: a browser's request goes the long way.
        let plain = only(headers, header::HOST).and_then(|host| host.to_str().ok()).is_some_and(|host| Authority::try_from(host).is_ok())
            && !headers.contains_key(header::ORIGIN)
            && !headers.contains_key(header::TRANSFER_ENCODING)
            && !headers.keys().any(|name| name.as_str().starts_with("mcp-param-"));
        *method == Method::POST
            && stateless
            && plain
            && only(headers, "mcp-method").is_some_and(|m| m == "tools/call")
            && only(headers, "mcp-name").is_some_and(|n| ToolCall::NAMES.iter().any(|t| n == *t))
            && only(headers, header::CONTENT_TYPE).is_some_and(is_json)
            && accepts_json_and_events(headers)
            && only(headers, header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|length| length <= self.max_body)
    }

    async fn read_and_answer(&self, mcp: &McpService, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let body = match axum::body::to_bytes(body, self.max_body).await {
            Ok(body) => body,
            // as rmcp words it
            Err(e) => return internal_error(format!("Failed to read request body: {e}")),
        };
        match self.answer(&parts, &body).await {
            Some(response) => response,
            None => mcp.handle(Request::from_parts(parts, Body::from(body))).await.into_response(),
        }
    }

    /// The reply to a qualifying request; `None` when its body leaves the narrow shape
    /// answered here.
    async fn answer(&self, parts: &http::request::Parts, body: &Bytes) -> Option<Response> {
        let envelope: Envelope = serde_json::from_slice(body).ok()?;
        let Params { name, arguments, meta } = envelope.params;
        let meta = RequestMetaObject::from(rmcp::model::MetaObject(meta));
        let well_formed = envelope.jsonrpc == "2.0"
            && envelope.method == "tools/call"
            && only(&parts.headers, "mcp-name").is_some_and(|n| n == name.as_str())
            && meta.protocol_version().as_ref() == Some(&ProtocolVersion::V_2026_07_28)
            && meta.missing_required_keys(&ProtocolVersion::V_2026_07_28).is_empty();
        if !well_formed {
            return None;
        }
        // arguments rmcp would refuse are refused in rmcp's words
        let call = ToolCall::parse(&name, arguments)?.ok()?;
        // From here the call is made whatever happens, and never handed to rmcp to be made
        // again. Its own task, as in rmcp: a client that hangs up does not cut it short.
        let tools = self.tools.clone();
        let found = Credentials::from_parts(parts);
        let (bearer, client) = (found.bearer.map(str::to_owned), found.client);
        let ran = tokio::spawn(async move {
            let credentials = Credentials { bearer: bearer.as_deref(), in_session: false, client };
            tools.call(call, credentials).await
        });
        let Ok(result) = ran.await else {
            return Some(internal_error("the tool call failed".into()));
        };
        let mut result = ServerResult::CallToolResult(result);
        // what rmcp does to every 2026-07-28 result (nothing, for a tool's, today)
        result.fill_missing_cache_hints();
        Some(match serde_json::to_vec(&ServerJsonRpcMessage::response(result, envelope.id)) {
            Ok(reply) => ([(header::CONTENT_TYPE, HeaderValue::from_static(JSON))], reply).into_response(),
            Err(e) => internal_error(format!("the reply could not be serialized: {e}")),
        })
    }
}

fn internal_error(message: String) -> Response {
    tracing::warn!(%message, "a direct tool call failed");
    (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
}

/// The header's one value; `None` when it is missing or given more than once.
fn only(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    values.next().is_none().then_some(first)
}

fn modern_version(headers: &HeaderMap) -> bool {
    only(headers, "mcp-protocol-version").is_some_and(|v| v == ProtocolVersion::V_2026_07_28.as_str())
}

fn is_json(content_type: &HeaderValue) -> bool {
    let Ok(value) = content_type.to_str() else { return false };
    value.split(';').next().is_some_and(|essence| essence.trim().eq_ignore_ascii_case(JSON))
}

/// Both types named plainly; anything with parameters (weights, quotes) goes to rmcp,
/// whose parser decides what they mean.
fn accepts_json_and_events(headers: &HeaderMap) -> bool {
    let (mut json, mut events) = (false, false);
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { return false };
        for item in value.split(',').map(str::trim) {
            if item.contains([';', '"']) {
                return false;
            }
            json |= item.eq_ignore_ascii_case(JSON);
            events |= item.eq_ignore_ascii_case(EVENT_STREAM);
        }
    }
    json && events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::relay::Limits;
    use crate::store::MemoryStore;
    use serde_json::{Value, json};

    fn direct() -> DirectCalls {
        let relay = Arc::new(Relay::new(Arc::new(MemoryStore::new()), Arc::new(SystemClock), Limits::default()));
        let config = StreamableHttpServerConfig::default().with_json_response(true).disable_allowed_hosts();
        DirectCalls::new(relay, &config.with_max_request_body_bytes(4096)).expect("a config mirrored here")
    }

    fn request(name: &'static str, arguments: Value) -> (HeaderMap, Value) {
        let mut map = headers(&[
            ("host", "127.0.0.1:8765"),
            ("accept", "application/json, text/event-stream"),
            ("content-type", "application/json"),
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", name),
        ]);
        let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {}});
        let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": meta}});
        map.insert(header::CONTENT_LENGTH, body.to_string().len().into());
        (map, body)
    }

    async fn answer(direct: &DirectCalls, headers: &HeaderMap, body: &Value) -> Option<Value> {
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.headers = headers.clone();
        let response = direct.answer(&parts, &Bytes::from(body.to_string())).await?;
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn rmcp_settings_not_mirrored_here_turn_it_off() {
        let relay = || Arc::new(Relay::new(Arc::new(MemoryStore::new()), Arc::new(SystemClock), Limits::default()));
        let mirrored = StreamableHttpServerConfig::default().with_json_response(true).disable_allowed_hosts();
        assert!(DirectCalls::new(relay(), &mirrored).is_some());
        for other in [
            mirrored.clone().with_json_response(false),
            mirrored.clone().with_stateless_protocol_metadata_required(true),
            mirrored.clone().with_allowed_hosts(["localhost"]),
            mirrored.clone().with_allowed_origins(["http://localhost"]),
        ] {
            assert!(DirectCalls::new(relay(), &other).is_none(), "{other:?}");
        }
    }

    #[tokio::test]
    async fn a_plain_tool_call_is_answered_here_and_the_rest_is_not() {
        let direct = direct();
        let (head, body) = request("register", json!({"group_id": "g", "hostname": "h", "working_directory": "/w"}));
        assert!(direct.qualifies(&Method::POST, &head));
        let reply = answer(&direct, &head, &body).await.expect("answered directly");
        assert_eq!(reply["id"], 3);
        assert_eq!(reply["result"]["resultType"], "complete");
        assert_eq!(reply["result"]["structuredContent"]["group_id"], "g");
        let token = reply["result"]["structuredContent"]["token"].as_str().unwrap().to_owned();

        let (mut head, body) = request("list_peers", json!({}));
        head.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        let reply = answer(&direct, &head, &body).await.expect("answered directly");
        assert_eq!(reply["result"]["structuredContent"]["peers"][0]["working_directory"], "/w");

        // heads that go to rmcp
        assert!(!direct.qualifies(&Method::GET, &head));
        let mut bent = head.clone();
        bent.insert("mcp-session-id", HeaderValue::from_static("s"));
        assert!(!direct.qualifies(&Method::POST, &bent));
        let mut bent = head.clone();
        bent.insert(header::CONTENT_LENGTH, 4097.into());
        assert!(!direct.qualifies(&Method::POST, &bent));
        let mut bent = head.clone();
        bent.insert("mcp-name", HeaderValue::from_static("nope"));
        assert!(!direct.qualifies(&Method::POST, &bent));
        let mut bent = head.clone();
        bent.insert("host", HeaderValue::from_static("::1"));
        assert!(!direct.qualifies(&Method::POST, &bent), "a Host rmcp refuses to parse");
        // bodies that go to rmcp
        let mut bent = body.clone();
        bent["params"]["name"] = json!("send_dm");
        assert!(answer(&direct, &head, &bent).await.is_none(), "the name header and the body differ");
        let mut bent = body.clone();
        bent["params"]["arguments"] = json!({"group_id": 7});
        assert!(answer(&direct, &head, &bent).await.is_none(), "arguments rmcp refuses in its words");
        let mut bent = body.clone();
        bent["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2025-11-25");
        assert!(answer(&direct, &head, &bent).await.is_none(), "another version in _meta");
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn only_plainly_named_accept_types_qualify() {
        for ok in [&["application/json, text/event-stream"][..], &["text/event-stream", "Application/JSON"]] {
            let map = headers(&ok.iter().map(|v| ("accept", *v)).collect::<Vec<_>>());
            assert!(accepts_json_and_events(&map), "{ok:?}");
        }
        for bad in ["application/json", "application/json;q=0, text/event-stream", "*/*", "application/json, text/event-stream;q=0.5"] {
            assert!(!accepts_json_and_events(&headers(&[("accept", bad)])), "{bad}");
        }
    }

    #[test]
    fn a_header_given_twice_has_no_one_value() {
        assert!(only(&headers(&[("mcp-method", "tools/call"), ("mcp-method", "tools/call")]), "mcp-method").is_none());
        assert_eq!(only(&headers(&[("mcp-method", "tools/call")]), "mcp-method").unwrap(), "tools/call");
    }

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "application/json; charset=utf-8", " APPLICATION/JSON "] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in ["text/json", "application/jsonx", "application/x-json"] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }
}
