//! MCP sessions (protocol 2025-11-25) are bounded: a flood of `initialize` cannot grow the
//! server without limit, and does not push out a session that is in use.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Mode, TestServer};

/// Opens a session as a bare client would: `initialize` and `initialized`, nothing more.
async fn bare_session(http: &reqwest::Client, server: &TestServer) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "flood", "version": "0"}}});
    let response = post(http, server, None, &init).await;
    assert_eq!(response.status(), 200);
    let id = response.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert!(post(http, server, Some(&id), &initialized).await.status().is_success());
    id
}

async fn post(http: &reqwest::Client, server: &TestServer, session: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = http
        .post(server.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(id) = session {
        request = request.header("mcp-session-id", id).header("mcp-protocol-version", "2025-11-25");
    }
    request.send().await.unwrap()
}

/// Whether the session still answers a request.
async fn alive(http: &reqwest::Client, server: &TestServer, session: &str) -> bool {
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let response = post(http, server, Some(session), &list).await;
    match response.status().as_u16() {
        200 => true,
        404 => false,
        other => panic!("tools/list answered {other}: {}", response.text().await.unwrap()),
    }
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    let text = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_flood_of_sessions_is_bounded_and_a_used_session_stays() {
    let server = TestServer::start_with(|c| c.max_sessions = 4).await;
    let http = reqwest::Client::new();
    let working = server.client_with(None, Mode::Session).await;
    working.service.list_all_tools().await.unwrap();
    let mut flood = Vec::new();
    for _ in 0..20 {
        flood.push(bare_session(&http, &server).await);
    }

    assert!(metric(&server, "relay_mcp_sessions").await <= 4.0);
    assert!(metric(&server, "relay_mcp_sessions_closed_for_room_total").await >= 17.0);
    // the session in use is kept; the flood made room from its own oldest
    assert_eq!(working.service.list_all_tools().await.unwrap().len(), 8, "the working session was closed");
    let mut answering = Vec::new();
    for (i, id) in flood.iter().enumerate() {
        if alive(&http, &server, id).await {
            answering.push(i);
        }
    }
    assert_eq!(answering, [17, 18, 19], "which of the flood's sessions answer");
    server.stop().await;
}

#[tokio::test]
async fn a_session_that_never_asks_anything_is_closed() {
    let server = TestServer::start_with(|c| c.unused_session_secs = 1).await;
    let http = reqwest::Client::new();
    let idle = bare_session(&http, &server).await;
    let used = bare_session(&http, &server).await;
    assert!(alive(&http, &server, &used).await);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // (closed when the next session opens)
    let fresh = bare_session(&http, &server).await;
    assert!(!alive(&http, &server, &idle).await, "an unused session outlived unused_session_secs");
    assert!(alive(&http, &server, &used).await, "a session that made a request was closed");
    assert!(alive(&http, &server, &fresh).await);
    server.stop().await;
}
