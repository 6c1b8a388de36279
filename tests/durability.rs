//! kill -9 the real server while messages flow, restart it on the same data dir: every
//! acknowledged message is there, and a resumed stream gets the rest exactly once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_e2e::ServerProcess;
use relay_e2e::mcp::{Client, Mode};
use relay_e2e::sse::EventStream;
use serde_json::{Value, json};

async fn register(server: &ServerProcess, dir: &str) -> Value {
    let anon = Client::connect(&server.url("/mcp"), None, Mode::Stateless).await;
    anon.ok("register", json!({"group_id": "durable", "hostname": "box", "working_directory": dir})).await
}

fn stream_url(server: &ServerProcess, reg: &Value) -> String {
    server.url(&format!("/notifications/durable/{}", reg["peer_id"].as_str().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_kill_9_and_streams_resume_exactly_once() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let args = ["--data-dir", data_dir.as_str(), "--rate-burst", "100000", "--rate-per-second", "100000"];
    let mut server = ServerProcess::start(0, &args);
    let alice = register(&server, "/src/alice").await;
    let bob = register(&server, "/src/bob").await;
    let (alice_token, bob_token) = (alice["token"].as_str().unwrap(), bob["token"].as_str().unwrap());

    let mut events = EventStream::open(&stream_url(&server, &bob), Some(bob_token), None).await;
    let sender = Client::connect(&server.url("/mcp"), Some(alice_token), Mode::Stateless).await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let flow = tokio::spawn({
        let acked = acked.clone();
        async move {
            for i in 0.. {
                let text = format!("msg {i}");
                let args = json!({"message": text}).as_object().cloned().unwrap();
                let call = rmcp::model::CallToolRequestParams::new("send_message").with_arguments(args);
                match sender.service.call_tool(call).await {
                    Ok(r) if r.is_error != Some(true) => acked.lock().unwrap().push(text),
                    _ => break, // the server is gone
                }
            }
        }
    });
    // let messages flow, then pull the plug mid-stream
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill_hard();
    let _ = tokio::time::timeout(Duration::from_secs(30), flow).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 200);
    let before: Vec<(u64, String)> = events
        .drain(Duration::from_millis(500))
        .await
        .into_iter()
        .map(|e| (e.id.unwrap().parse().unwrap(), e.data["preview"].as_str().unwrap().to_owned()))
        .collect();
    assert!(events.ended(), "the stream outlived its server");

    let server = ServerProcess::start(0, &args);
    // everything acknowledged is stored, in order (one more may have committed unacknowledged)
    let bob_client = Client::connect(&server.url("/mcp"), Some(bob_token), Mode::Stateless).await;
    let inbox = bob_client.ok("read_new_messages", json!({"limit": 1000})).await;
    let stored: Vec<String> = inbox["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(&stored[..acked.len()], &acked[..], "an acknowledged message is missing after kill -9");
    assert!(stored.len() <= acked.len() + 1);

    // the stream resumes after the last event bob saw and gets the rest exactly once
    let last_seen = before.last().map_or(0, |(seq, _)| *seq);
    let mut resumed = EventStream::open(&stream_url(&server, &bob), Some(bob_token), Some(last_seen)).await;
    let alice_again = Client::connect(&server.url("/mcp"), Some(alice_token), Mode::Stateless).await;
    alice_again.ok("send_message", json!({"message": "after the restart"})).await;
    let after: Vec<String> =
        resumed.drain(Duration::from_millis(800)).await.into_iter().map(|e| e.data["preview"].as_str().unwrap().to_owned()).collect();
    let mut all: Vec<String> = before.into_iter().map(|(_, p)| p).collect();
    all.extend(after);
    let mut want = stored.clone();
    want.push("after the restart".into());
    assert_eq!(all, want, "stream before + after the crash must be every stored message once, in order");
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len());
}

#[tokio::test]
async fn sigterm_stops_the_server_cleanly_and_closes_streams() {
    let data = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(0, &["--data-dir", data.path().to_str().unwrap()]);
    let bob = register(&server, "/src/bob").await;
    let mut events = EventStream::open(&stream_url(&server, &bob), Some(bob["token"].as_str().unwrap()), None).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.stop();
        (status, server)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "relay-server exited with {status}");
    assert!(events.next(Duration::from_secs(5)).await.is_none());
    assert!(events.ended());
    assert!(data.path().join("relay.sqlite3").exists());
}

#[test]
fn refuses_to_listen_publicly_without_join_keys() {
    let out =
        std::process::Command::new(relay_e2e::binary("relay-server")).args(["--listen", "0.0.0.0:0", "--ephemeral"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--require-join-keys") && stderr.contains("--insecure"), "{stderr}");
}
