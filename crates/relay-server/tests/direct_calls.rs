//! Stateless `tools/call` requests answered directly get the reply rmcp gives: the same
//! requests, plain and malformed, sent to a server with direct calls and one without.

mod support;

use regex::Regex;
use serde_json::{Value, json};
use support::*;

const VERSION: &str = "2026-07-28";

/// A modern `tools/call` request that can be bent out of shape.
struct Call {
    headers: Vec<(&'static str, String)>,
    body: Value,
}

fn call(name: &str, arguments: Value) -> Call {
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": VERSION,
        "io.modelcontextprotocol/clientInfo": {"name": "test", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    Call {
        headers: vec![
            ("accept", "application/json, text/event-stream".into()),
            ("content-type", "application/json".into()),
            ("mcp-protocol-version", VERSION.into()),
            ("mcp-method", "tools/call".into()),
            ("mcp-name", name.into()),
        ],
        body: json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": meta}}),
    }
}

impl Call {
    fn bearer(mut self, token: &str) -> Self {
        self.headers.push(("authorization", format!("Bearer {token}")));
        self
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.into()));
        self
    }

    fn also_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn without(mut self, name: &'static str) -> Self {
        self.headers.retain(|(n, _)| *n != name);
        self
    }

    fn body(mut self, edit: impl FnOnce(&mut Value)) -> Self {
        edit(&mut self.body);
        self
    }
}

async fn post(server: &TestServer, call: &Call, raw_body: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(server.url("/mcp"));
    for (name, value) in &call.headers {
        request = request.header(*name, value);
    }
    let body = raw_body.map_or_else(|| call.body.to_string(), str::to_owned);
    request.body(body).send().await.unwrap()
}

/// Status, content type and body, with ids, tokens and times masked.
async fn send(server: &TestServer, call: Call, raw_body: Option<&str>) -> (u16, String, String) {
    let response = post(server, &call, raw_body).await;
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = response.text().await.unwrap();
    let masks = [
        (r"rly_[0-9a-f]{64}", "TOKEN"),
        (r"\b([pmde])_[0-9a-f]{12}\b", "${1}_ID"),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", "TIME"),
    ];
    let text = masks.iter().fold(text, |t, (re, with)| Regex::new(re).unwrap().replace_all(&t, *with).into_owned());
    (status, content_type, text)
}

/// Registers in group "team" and returns the token.
async fn register(server: &TestServer, dir: &str) -> String {
    let reply: Value = post(server, &registration(dir), None).await.json().await.unwrap();
    let token = reply["result"]["structuredContent"]["token"].as_str().unwrap_or_default().to_owned();
    assert!(token.starts_with("rly_"), "{reply}");
    token
}

fn registration(dir: &str) -> Call {
    call("register", json!({"group_id": "team", "hostname": "box", "working_directory": dir}))
}

/// Every reply of one run, labelled, against a fresh server.
// (long: the list of requests compared is the test; split, it would be harder to audit)
async fn run(server: &TestServer) -> Vec<(&'static str, (u16, String, String))> {
    let alice = register(server, "/src/alice").await;
    let bob = register(server, "/src/bob").await;
    let cases: Vec<(&'static str, Call, Option<&str>)> = vec![
        ("register again", registration("/src/alice"), None),
        ("register again, by header", registration("/src/alice").bearer(&alice), None),
        ("list_peers", call("list_peers", json!({})).bearer(&alice), None),
        ("list_peers, token argument", call("list_peers", json!({"token": bob})), None),
        ("send_message", call("send_message", json!({"message": "hello"})).bearer(&alice), None),
        ("send_dm", call("send_dm", json!({"to": "box:alice", "message": "psst"})).bearer(&bob), None),
        ("send_dm, unknown peer", call("send_dm", json!({"to": "carol", "message": "psst"})).bearer(&bob), None),
        ("read_new_messages", call("read_new_messages", json!({"limit": 10})).bearer(&bob), None),
        ("get_history", call("get_history", json!({"filter": "(?i)HELLO"})).bearer(&bob), None),
        ("get_history, bad regex", call("get_history", json!({"filter": "("})).bearer(&bob), None),
        ("message_status, unknown", call("message_status", json!({"message_id": "m_000000000000"})).bearer(&bob), None),
        ("string id", call("list_peers", json!({})).bearer(&alice).body(|b| b["id"] = json!("x-1")), None),
        ("no token", call("list_peers", json!({})), None),
        ("unknown token", call("list_peers", json!({})).bearer("rly_nope"), None),
        ("arguments of the wrong type", call("send_message", json!({"message": 42})).bearer(&alice), None),
        ("missing argument", call("send_dm", json!({"message": "x"})).bearer(&alice), None),
        ("unknown tool", call("nope", json!({})), None),
        ("name header differs", call("list_peers", json!({})).bearer(&alice).header("mcp-name", "send_dm"), None),
        ("method header differs", call("list_peers", json!({})).bearer(&alice).header("mcp-method", "tools/list"), None),
        ("method header twice", call("list_peers", json!({})).bearer(&alice).also_header("mcp-method", "tools/call"), None),
        ("no name header", call("list_peers", json!({})).bearer(&alice).without("mcp-name"), None),
        (
            "no meta",
            call("list_peers", json!({})).bearer(&alice).body(|b| b["params"].as_object_mut().unwrap().remove("_meta").map(drop).unwrap()),
            None,
        ),
        (
            "meta version differs",
            call("list_peers", json!({}))
                .bearer(&alice)
                .body(|b| b["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2025-11-25")),
            None,
        ),
        (
            "meta without capabilities",
            call("list_peers", json!({})).bearer(&alice).body(|b| {
                b["params"]["_meta"].as_object_mut().unwrap().remove("io.modelcontextprotocol/clientCapabilities").map(drop).unwrap()
            }),
            None,
        ),
        (
            "no arguments",
            call("list_peers", json!({}))
                .bearer(&alice)
                .body(|b| b["params"].as_object_mut().unwrap().remove("arguments").map(drop).unwrap()),
            None,
        ),
        ("extra params field", call("list_peers", json!({})).bearer(&alice).body(|b| b["params"]["extra"] = json!(1)), None),
        ("jsonrpc 1.0", call("list_peers", json!({})).bearer(&alice).body(|b| b["jsonrpc"] = json!("1.0")), None),
        ("fractional id", call("list_peers", json!({})).bearer(&alice).body(|b| b["id"] = json!(1.5)), None),
        ("older protocol header", call("list_peers", json!({})).bearer(&alice).header("mcp-protocol-version", "2025-11-25"), None),
        ("a Host rmcp cannot parse", call("list_peers", json!({})).bearer(&alice).header("host", "::1"), None),
        ("unknown session", call("list_peers", json!({})).bearer(&alice).header("mcp-session-id", "nope"), None),
        ("accepts json only", call("list_peers", json!({})).bearer(&alice).header("accept", "application/json"), None),
        (
            "accept with weights",
            call("list_peers", json!({})).bearer(&alice).header("accept", "application/json;q=0.9, text/event-stream"),
            None,
        ),
        ("text content type", call("list_peers", json!({})).bearer(&alice).header("content-type", "text/plain"), None),
        (
            "charset content type",
            call("list_peers", json!({})).bearer(&alice).header("content-type", "application/json; charset=utf-8"),
            None,
        ),
        ("not JSON", call("list_peers", json!({})).bearer(&alice), Some("{\"jsonrpc\": ")),
        ("a batch", call("list_peers", json!({})).bearer(&alice), Some("[]")),
        ("empty body", call("list_peers", json!({})).bearer(&alice), Some("")),
        ("leave_group", call("leave_group", json!({"group_id": "team"})).bearer(&bob), None),
        ("list_peers after leaving", call("list_peers", json!({})).bearer(&bob), None),
    ];
    let mut replies = Vec::new();
    for (label, c, raw) in cases {
        replies.push((label, send(server, c, raw).await));
    }
    replies
}

#[tokio::test]
async fn direct_replies_are_the_replies_rmcp_gives() {
    let direct = TestServer::start().await;
    let through_rmcp = TestServer::start_with(|c| c.direct_tool_calls = false).await;
    let (ours, theirs) = (run(&direct).await, run(&through_rmcp).await);
    for ((label, a), (_, b)) in ours.iter().zip(&theirs) {
        assert_eq!(a, b, "{label}: direct (left) and through rmcp (right) differ");
    }
    // the run covers successes, tool errors, and protocol refusals
    let statuses: Vec<u16> = ours.iter().map(|(_, (s, _, _))| *s).collect();
    for status in [200, 400, 406, 415] {
        assert!(statuses.contains(&status), "no {status} among {statuses:?}");
    }
    assert!(ours.iter().any(|(_, (_, _, body))| body.contains("\"isError\":true")));
    assert!(ours.iter().any(|(label, (_, _, body))| *label == "read_new_messages" && body.contains("hello")));
    direct.stop().await;
    through_rmcp.stop().await;
}
