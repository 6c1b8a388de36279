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
    let (_bob, b) = server.peer("team", "/src/bob").await;
    let (_carol, c) = server.peer("team", "/src/carol").await;
    let url = |reg: &serde_json::Value| server.url(&format!("/notifications/team/{}", reg["peer_id"].as_str().unwrap()));
    let token = |reg: &serde_json::Value| reg["token"].as_str().unwrap().to_owned();
    // bob's stream is opened and then not read; carol's keeps up
    let mut stalled = EventStream::open(&url(&b), Some(&token(&b)), None).await;
    let mut reading = EventStream::open(&url(&c), Some(&token(&c)), None).await;
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
    // without the bound, bob's stream held all 24 MB of text
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
    assert!(stalled.drain(SHORT).await.iter().all(|e| e.event.as_deref() != Some("message")), "a message came twice");
    server.stop().await;
}
