//! The SSE event streams: what each peer sees, resuming, presence, slow clients.

mod support;

use std::time::Duration;

use relay_server::Caller;
use serde_json::json;
use support::*;

fn stream_url(server: &TestServer, reg: &serde_json::Value) -> String {
    server.url(&format!("/notifications/{}/{}", reg["group_id"].as_str().unwrap(), reg["peer_id"].as_str().unwrap()))
}

fn token(reg: &serde_json::Value) -> &str {
    reg["token"].as_str().unwrap()
}

#[tokio::test]
async fn each_peer_sees_broadcasts_its_dms_and_membership() {
    let server = TestServer::start().await;
    let (alice, a) = server.peer("team", "/src/alice").await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let (_carol, c) = server.peer("team", "/src/carol").await;
    let mut bob_events = EventStream::open(&stream_url(&server, &b), Some(token(&b)), None).await;
    let mut carol_events = EventStream::open(&stream_url(&server, &c), Some(token(&c)), None).await;
    assert_eq!(bob_events.status, 200);

    alice.ok("send_message", json!({"message": "hello team, a long line\nwith a break"})).await;
    alice.ok("send_dm", json!({"to": b["peer_id"], "message": "for bob only"})).await;
    let (_dave, d) = server.peer("team", "/src/dave").await;

    let bob_seen = bob_events.drain(SHORT).await;
    let kinds: Vec<_> = bob_seen.iter().map(|e| e.event.clone().unwrap()).collect();
    assert_eq!(kinds, ["message", "dm", "peer_joined"]);
    let msg = &bob_seen[0].data;
    assert_eq!(msg["kind"], "message");
    assert_eq!(msg["group"], "team");
    assert_eq!(msg["sender"]["peer_id"], a["peer_id"]);
    assert_eq!(msg["sender"]["name"], "box:alice");
    assert_eq!(msg["preview"], "hello team, a long line with a break");
    assert!(msg["id"].as_str().unwrap().starts_with("m_"));
    assert_eq!(bob_seen[0].id.as_deref(), Some(msg["seq"].to_string().as_str()));
    assert_eq!(bob_seen[1].data["recipient"]["peer_id"], b["peer_id"]);
    assert_eq!(bob_seen[2].data["sender"]["peer_id"], d["peer_id"]);

    // carol: the broadcast and the join, never bob's DM
    let carol_kinds: Vec<_> = carol_events.drain(SHORT).await.into_iter().map(|e| e.event.unwrap()).collect();
    assert_eq!(carol_kinds, ["message", "peer_joined"]);
}

#[tokio::test]
async fn last_event_id_resumes_exactly_where_the_client_stopped() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let url = stream_url(&server, &b);

    let mut first = EventStream::open(&url, Some(token(&b)), None).await;
    for i in 0..3 {
        alice.ok("send_message", json!({"message": format!("before {i}")})).await;
    }
    let got = first.drain(SHORT).await;
    assert_eq!(got.len(), 3);
    let last_id: u64 = got[1].id.as_ref().unwrap().parse().unwrap();
    drop(first); // the client saw only two of them, say

    for i in 0..600 {
        alice.ok("send_message", json!({"message": format!("while away {i}")})).await;
    }
    let mut resumed = EventStream::open(&url, Some(token(&b)), Some(last_id)).await;
    alice.ok("send_message", json!({"message": "after"})).await;
    let texts: Vec<String> = resumed.drain(SHORT).await.iter().map(|e| e.data["preview"].as_str().unwrap().to_owned()).collect();
    let mut want = vec!["before 2".to_owned()];
    want.extend((0..600).map(|i| format!("while away {i}")));
    want.push("after".to_owned());
    assert_eq!(texts, want);
}

#[tokio::test]
async fn streams_need_the_peers_own_token() {
    let server = TestServer::start().await;
    let (_alice, a) = server.peer("team", "/src/alice").await;
    let (_eve, e) = server.peer("team", "/src/eve").await;
    let url = stream_url(&server, &a);
    assert_eq!(EventStream::open(&url, None, None).await.status, 401);
    assert_eq!(EventStream::open(&url, Some("rly_forged"), None).await.status, 401);
    assert_eq!(EventStream::open(&url, Some(token(&e)), None).await.status, 403);
    let wrong_group = server.url(&format!("/notifications/other/{}", a["peer_id"].as_str().unwrap()));
    assert_eq!(EventStream::open(&wrong_group, Some(token(&a)), None).await.status, 403);
    let resp = reqwest::Client::new().get(&url).bearer_auth(token(&a)).header("last-event-id", "yesterday").send().await.unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn a_peer_is_online_while_it_has_a_stream() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let online = |v: serde_json::Value| {
        v["peers"].as_array().unwrap().iter().find(|p| p["peer_id"] == b["peer_id"]).unwrap()["online"].as_bool().unwrap()
    };
    assert!(!online(alice.ok("list_peers", json!({})).await));
    let stream = EventStream::open(&stream_url(&server, &b), Some(token(&b)), None).await;
    assert!(online(alice.ok("list_peers", json!({})).await));
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("relay_open_streams{kind=\"peer\"} 1"), "{metrics}");
    drop(stream);
    let deadline = tokio::time::Instant::now() + LONG;
    while online(alice.ok("list_peers", json!({})).await) {
        assert!(tokio::time::Instant::now() < deadline, "bob still online after his stream closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn leaving_ends_the_peers_stream() {
    let server = TestServer::start().await;
    let (_alice, _) = server.peer("team", "/src/alice").await;
    let (bob, b) = server.peer("team", "/src/bob").await;
    let mut events = EventStream::open(&stream_url(&server, &b), Some(token(&b)), None).await;
    bob.ok("leave_group", json!({"group_id": "team"})).await;
    let last = events.next(LONG).await.unwrap();
    assert_eq!(last.event.as_deref(), Some("peer_left"));
    assert!(events.next(LONG).await.is_none());
    assert!(events.ended());
}

#[tokio::test]
async fn heartbeats_keep_idle_streams_alive() {
    let server = TestServer::start_with(|c| c.heartbeat_secs = 1).await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let mut events = EventStream::open(&stream_url(&server, &b), Some(token(&b)), None).await;
    assert!(events.next(Duration::from_millis(2500)).await.is_none());
    assert!(events.comments >= 1, "no heartbeat comment in 2.5 s");
    assert!(!events.ended());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_cut_off_and_resumes_without_loss() {
    let server = TestServer::start_with(|c| {
        c.stream_buffer = 16;
        c.rate_burst = u32::MAX;
    })
    .await;
    let (_alice, a) = server.peer("team", "/src/alice").await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let alice = server.relay.identify(token(&a)).unwrap();
    let url = stream_url(&server, &b);

    // open the stream and read nothing while far more than the buffer (and the socket) can hold goes by
    let mut stalled = EventStream::open(&url, Some(token(&b)), None).await;
    let total = 20_000;
    send_many(&server, &alice, 0..total).await;
    // reading again: what the socket held, then the end, not everything
    let got = stalled.drain(Duration::from_secs(2)).await;
    assert!(stalled.ended(), "the stalled stream was not closed");
    assert!(got.len() < total, "a stalled stream received everything, so it was never bounded");
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("relay_streams_dropped_slow_total 1"), "{metrics}");

    // resuming from the last event it got fetches the rest, once each
    let last: u64 = got.last().map_or(0, |e| e.id.as_ref().unwrap().parse().unwrap());
    let mut resumed = EventStream::open(&url, Some(token(&b)), Some(last)).await;
    let rest = resumed.drain(Duration::from_secs(2)).await;
    let previews: Vec<String> = got
        .iter()
        .chain(&rest)
        .filter(|e| e.event.as_deref() == Some("message"))
        .map(|e| e.data["preview"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..total).map(|i| format!("n{i}")).collect();
    assert_eq!(previews.len(), expected.len(), "resumed from {last}: {} before, {} after", got.len(), rest.len());
    assert_eq!(previews, expected);
}

async fn send_many(server: &TestServer, caller: &Caller, range: std::ops::Range<usize>) {
    for i in range {
        server.relay.send_message(caller, &format!("n{i}"), None, None).unwrap();
        if i % 64 == 0 {
            tokio::task::yield_now().await; // let the server write what the socket takes
        }
    }
}

#[tokio::test]
async fn forged_host_headers_are_refused_everywhere_but_healthz() {
    let server = TestServer::start().await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let http = reqwest::Client::new();
    for path in ["/mcp", "/metrics", &format!("/notifications/team/{}", b["peer_id"].as_str().unwrap())] {
        let resp = http.get(server.url(path)).header("host", "evil.example").bearer_auth(token(&b)).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{path}");
    }
    let resp = http
        .post(server.url("/mcp"))
        .header("host", "attacker.example:8765")
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = http.get(server.url("/healthz")).header("host", "10.0.0.1").send().await.unwrap();
    assert_eq!(resp.status(), 200);

    let open = TestServer::start_with(|c| c.allowed_hosts = vec!["relay.example.com".into()]).await;
    let resp = http.get(open.url("/metrics")).header("host", "relay.example.com").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = http.get(open.url("/metrics")).send().await.unwrap(); // Host: 127.0.0.1:port
    assert_eq!(resp.status(), 403);
}
