//! The front door, spoken to over raw TCP: event streams served without hyper, and what a
//! broken or vanishing client gets.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` and reads what comes back within `wait` (or until the server closes).
async fn exchange(server: &TestServer, request: &[u8], wait: Duration) -> String {
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(wait, tcp.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

fn stream_request(reg: &serde_json::Value, version: &str) -> String {
    format!(
        "GET /notifications/{}/{} {version}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
        reg["group_id"].as_str().unwrap(),
        reg["peer_id"].as_str().unwrap(),
        reg["token"].as_str().unwrap()
    )
}

/// `relay_open_streams` for peers, from /metrics.
fn open_streams(server: &TestServer) -> i64 {
    let text = server.relay.metrics.render();
    let line = text.lines().find(|l| l.starts_with("relay_open_streams{kind=\"peer\"}")).unwrap_or_else(|| panic!("{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Waits (without blocking the server, which runs on this test's runtime) for `done`.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_stream_is_chunked_sse_and_closing_the_client_ends_it() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(stream_request(&b, "HTTP/1.1").as_bytes()).await.unwrap();
    alice.ok("send_message", json!({"message": "over raw tcp"})).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("over raw tcp") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.expect("the event").unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{text}");
    assert!(head.contains("content-type: text/event-stream") && head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("connection: close") && !head.contains("content-length"), "{head}");
    // each event is one chunk: its length in hex, the SSE frame, CRLF
    assert!(text.contains("\r\nevent: message\nid: "), "{text}");
    assert_eq!(open_streams(&server), 1);
    drop(tcp);
    until("the stream to close", || open_streams(&server) == 0).await;
}

#[tokio::test]
async fn bad_requests_for_streams_get_clear_answers() {
    let server = TestServer::start().await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let wait = Duration::from_secs(5);

    let broken = exchange(&server, b"GET /notifications/team/x HTTP/1.1\r\nHo st\r\n\r\n", wait).await;
    assert!(broken.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{broken}");
    let huge = format!("GET /notifications/team/x HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    let too_large = exchange(&server, huge.as_bytes(), wait).await;
    assert!(too_large.starts_with("HTTP/1.1 431 "), "{too_large}");
    // no token: a 401 with its length, saying what to send
    let url = format!("GET /notifications/team/{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b["peer_id"].as_str().unwrap());
    let unauthorized = exchange(&server, url.as_bytes(), wait).await;
    assert!(unauthorized.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{unauthorized}");
    assert!(unauthorized.to_ascii_lowercase().contains("www-authenticate: bearer"), "{unauthorized}");
    assert!(unauthorized.ends_with("Authorization: Bearer <token>\n"), "{unauthorized}");
    assert_eq!(unauthorized.to_ascii_lowercase().matches("content-length: ").count(), 1, "{unauthorized}");
    // a Host that is not allowed is refused here as on every other route
    let foreign = stream_request(&b, "HTTP/1.1").replace("Host: 127.0.0.1", "Host: evil.example");
    assert!(exchange(&server, foreign.as_bytes(), wait).await.starts_with("HTTP/1.1 403 "));
    // an HTTP/1.0 client gets the body unchunked, ended by the close
    let old = exchange(&server, stream_request(&b, "HTTP/1.0").as_bytes(), Duration::from_millis(500)).await;
    assert!(old.starts_with("HTTP/1.1 200 OK\r\n") && !old.contains("chunked") && old.contains("\r\n\r\nretry: 2000\n"), "{old}");
    // and everything else still goes through hyper, keep-alive and all
    let health = exchange(&server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", wait).await;
    assert!(health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("ok\n"), "{health}");
}

#[tokio::test]
async fn shutdown_ends_open_streams_and_the_server_stops() {
    let server = TestServer::start().await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(stream_request(&b, "HTTP/1.1").as_bytes()).await.unwrap();
    until("the stream to open", || open_streams(&server) == 1).await;
    server.stop().await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await.expect("closed").unwrap();
    assert!(String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"), "the stream did not end cleanly");
}

/// Slowloris and idle sockets: a client that sends half a request head, sends nothing after
/// a response, or stalls inside hyper's protocol sniff holds no connection for long.
#[tokio::test]
async fn half_sent_heads_and_idle_connections_are_closed() {
    let server = TestServer::start_with(|c| {
        c.client_timeout_secs = 1;
        c.heartbeat_secs = 1;
    })
    .await;
    let closed_within = |request: &'static [u8]| {
        let addr = server.addr;
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(request).await.unwrap();
            let mut got = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got)).await;
            assert!(read.is_ok(), "a connection that sent {:?} was still open after 10 s", String::from_utf8_lossy(request));
            String::from_utf8_lossy(&got).into_owned()
        }
    };
    closed_within(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl").await;
    closed_within(b"GET /notifications/g/p HTTP/1.1\r\nHost: 127.0.0.1\r\n").await;
    closed_within(b"PRI * HTTP/2").await;
    closed_within(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"jsonrpc\"").await;
    // a whole request is answered; the kept-alive connection is closed when nothing follows
    let answered = closed_within(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
    assert!(answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok\n"), "{answered}");

    // a stream that stays open is not idle: its heartbeats keep it so
    let (_, reg) = server.peer("g", "/w").await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(stream_request(&reg, "HTTP/1.1").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await.unwrap().unwrap();
    assert!(n > 0 && String::from_utf8_lossy(&buf[..n]).contains("200"), "the stream closed");
}

/// Reads `tcp` into `got` until `text` is in it.
async fn read_until(tcp: &mut TcpStream, got: &mut Vec<u8>, text: &str) {
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(got).contains(text) {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("the event").unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_busy_stream_writes_its_events_together_and_a_quiet_one_at_once() {
    let server = TestServer::start_with(|c| c.stream_write_interval_ms = 1000).await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(stream_request(&b, "HTTP/1.1").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    read_until(&mut tcp, &mut got, "retry: ").await;
    // quiet for longer than the interval: the next event goes out as soon as it is sent
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let sent = std::time::Instant::now();
    alice.ok("send_message", json!({"message": "first"})).await;
    read_until(&mut tcp, &mut got, "first").await;
    let first_arrived = std::time::Instant::now();
    assert!(first_arrived - sent < Duration::from_millis(500), "a quiet stream's event waited {:?}", first_arrived - sent);
    // three more at once: they wait out the interval and come in one chunk
    got.clear();
    for text in ["second", "third", "fourth"] {
        alice.ok("send_message", json!({"message": text})).await;
    }
    read_until(&mut tcp, &mut got, "fourth").await;
    let waited = first_arrived.elapsed();
    assert!(waited >= Duration::from_millis(800), "written {waited:?} after the last write");
    let text = String::from_utf8_lossy(&got);
    let (second, fourth) = (text.find("second").unwrap(), text.find("fourth").unwrap());
    assert!(!text[second..fourth].contains("\r\n"), "not one chunk: {text:?}");
    assert!(text[second..fourth].contains("third"), "{text:?}");
}
