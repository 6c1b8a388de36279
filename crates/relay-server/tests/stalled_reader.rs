//! A stream that stops reading pins no messages in the server's memory, and gets every
//! message, once and in order, when it reads again. Alone in its file: it measures the
//! process's resident memory, which other tests running beside it would move.

mod support;

use serde_json::json;
use support::*;

const MESSAGES: usize = 120;
const TEXT_BYTES: usize = 200_000;

fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    kb.unwrap_or(0usize) * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_pins_no_messages_and_catches_up_from_the_store() {
    let server = TestServer::start_with(|c| {
        c.ephemeral = false; // the messages live in the database file, not in memory
        c.max_message_bytes = 256 * 1024;
        c.live_buffer_bytes = 4 << 20;
    })
    .await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (_carol, c) = server.peer("team", "/src/carol").await;
    // bob's machine: a daemon (relayd) stream, which carries whole texts; opened, then not
    // read, so the socket's buffers fill and the server's side of it stalls
    let http = reqwest::Client::new();
    let daemon: serde_json::Value =
        http.post(server.url("/v1/daemons")).json(&json!({"hostname": "bobs-box"})).send().await.unwrap().json().await.unwrap();
    let daemon_token = daemon["token"].as_str().unwrap();
    let bob = http
        .post(server.url("/v1/peers"))
        .bearer_auth(daemon_token)
        .json(&json!({"group_id": "team", "hostname": "bobs-box", "working_directory": "/src/bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bob.status(), 200);
    let mut stalled = EventStream::open(&server.url("/v1/groups/team/events"), Some(daemon_token), None).await;
    // carol's keeps up
    let url = server.url(&format!("/notifications/team/{}", c["peer_id"].as_str().unwrap()));
    let mut reading = EventStream::open(&url, Some(c["token"].as_str().unwrap()), None).await;
    reading.drain(SHORT).await;

    let before = resident_bytes();
    let text = "x".repeat(TEXT_BYTES);
    let mut seen = 0;
    for i in 0..MESSAGES {
        alice.ok("send_message", json!({"message": format!("{i:04}{text}")})).await;
        seen += reading.drain(std::time::Duration::from_millis(1)).await.len();
    }
    while seen < MESSAGES {
        let more = reading.drain(SHORT).await.len();
        assert!(more > 0, "carol's stream stopped at {seen}");
        seen += more;
    }
    let grown = resident_bytes().saturating_sub(before);
    eprintln!("resident memory grew {grown} bytes for {} bytes sent", MESSAGES * TEXT_BYTES);
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let held: f64 = metrics.lines().find_map(|l| l.strip_prefix("relay_live_buffer_bytes ")).unwrap().parse().unwrap();
    assert!(held <= (4 << 20) as f64, "{held} bytes held for the streams");
    // without the bound, bob's stream held what it did not read, up to all 24 MB of text
    let pinned = MESSAGES * TEXT_BYTES;
    assert!(grown < pinned / 2, "resident memory grew {grown} bytes while {pinned} bytes of messages were sent");

    // bob reads again: every message, in order, once
    let mut got = Vec::new();
    while let Some(event) = stalled.next(LONG).await {
        if event.event.as_deref() == Some("message") {
            got.push(event.data["preview"].as_str().unwrap()[..4].to_owned());
        }
        if got.len() == MESSAGES {
            break;
        }
    }
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("{i:04}")).collect();
    assert_eq!(got, want);
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let store_reads: f64 = metrics.lines().find_map(|l| l.strip_prefix("relay_stream_store_reads_total ")).unwrap().parse().unwrap();
    assert!(store_reads > 0.0, "the stalled stream never had to read from the store: it did not stall");
    assert!(stalled.drain(SHORT).await.iter().all(|e| e.event.as_deref() != Some("message")), "a message came twice");
    server.stop().await;
}
