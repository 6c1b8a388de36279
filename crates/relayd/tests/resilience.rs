//! The real binaries: kill -9 relayd while messages flow and restart it; stop the server
//! and restart it. Every pane ends with every message exactly once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_e2e::mcp::{Client as Mcp, Mode};
use relay_e2e::{KillOnDrop, ServerProcess, spawn_relayd};
use relay_local::client::Client;
use relay_proto::local::{AttachRequest, Reply, Request};
use serde_json::json;

struct Relayd {
    child: KillOnDrop,
    socket: PathBuf,
}

impl Relayd {
    async fn start(dir: &Path, server: &str) -> Self {
        let (child, socket) = spawn_relayd(dir, server, &["--no-notifications"], &[], Stdio::null());
        for _ in 0..500 {
            if Client::connect(&socket, "test").await.is_ok() {
                return Self { child, socket };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("relayd never opened its socket");
    }

    fn kill_hard(&mut self) {
        self.child.kill_hard();
    }
}

/// A pane's view: every event it got, and the last sequence number, as relay-pane keeps.
#[derive(Default)]
struct Pane {
    previews: Vec<String>,
    last_seq: u64,
}

/// Subscribes `pane` and records its events until the connection ends; returns when it does.
async fn follow(socket: PathBuf, pane: &'static str, view: Arc<Mutex<Pane>>) {
    let Ok(mut c) = Client::connect(&socket, "pane").await else { return };
    let since: BTreeMap<String, u64> = match view.lock().unwrap().last_seq {
        0 => BTreeMap::new(),
        seq => [("durable".to_owned(), seq)].into(),
    };
    if !matches!(c.request(&Request::Subscribe { pane: pane.into(), since }).await, Ok(Reply::Subscribed { .. })) {
        return;
    }
    while let Ok(reply) = c.next().await {
        // (receipts are not in the log: they carry their message's seq, not a new one)
        if let Reply::Event { event, .. } = reply
            && event.kind != relay_proto::EventKind::Receipt
        {
            let mut v = view.lock().unwrap();
            assert!(event.seq > v.last_seq, "{pane} got seq {} after {}", event.seq, v.last_seq);
            v.last_seq = event.seq;
            if event.kind == relay_proto::EventKind::Message {
                v.previews.push(event.preview);
            }
        }
    }
}

async fn attach(socket: &Path, pane: &str, dir: &str) {
    let mut c = Client::connect(socket, "test").await.unwrap();
    let req = AttachRequest { pane: pane.into(), group: "durable".into(), working_directory: dir.into(), ..Default::default() };
    assert!(matches!(c.request(&Request::Attach(req)).await.unwrap(), Reply::Attached { .. }));
}

/// Sends numbered messages until `stop`, through outages; returns what was acked. Every
/// attempt has a new number: an attempt whose reply was lost may still have been stored.
async fn sender(url: Arc<Mutex<String>>, token: String, stop: Arc<std::sync::atomic::AtomicBool>) -> Vec<String> {
    let mut acked = Vec::new();
    let mut n = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let current = url.lock().unwrap().clone();
        let text = format!("msg {n}");
        let call = async {
            let c = Mcp::try_connect(&current, Some(&token), Mode::Stateless).await.ok()?;
            let args = json!({"message": text}).as_object().cloned().unwrap();
            c.service.call_tool(rmcp::model::CallToolRequestParams::new("send_message").with_arguments(args)).await.ok()
        };
        n += 1;
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Some(r)) if r.is_error != Some(true) => acked.push(text),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_relayd_and_restart_the_server_every_pane_gets_every_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server-data");
    let data_arg = data.to_str().unwrap().to_owned();
    let mut server = ServerProcess::start(0, &["--data-dir", &data_arg]);
    let port = server.addr.port();
    let base = format!("http://127.0.0.1:{port}");
    let mut relayd = Relayd::start(dir.path(), &base).await;
    attach(&relayd.socket, "%1", "/src/one").await;
    attach(&relayd.socket, "%2", "/src/two").await;

    let far = Mcp::connect(&format!("{base}/mcp"), None, Mode::Stateless).await;
    let reg = far.ok("register", json!({"group_id": "durable", "hostname": "far", "working_directory": "/far"})).await;
    let panes: Vec<(&'static str, Arc<Mutex<Pane>>)> = vec![("%1", Arc::default()), ("%2", Arc::default())];
    let follow_all = |socket: PathBuf| panes.iter().map(|(p, v)| tokio::spawn(follow(socket.clone(), p, v.clone()))).collect::<Vec<_>>();
    let followers = follow_all(relayd.socket.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let url = Arc::new(Mutex::new(format!("{base}/mcp")));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flow = tokio::spawn(sender(url.clone(), reg["token"].as_str().unwrap().to_owned(), stop.clone()));

    // kill -9 relayd mid-flow, bring it back, panes resubscribe with what they have
    tokio::time::sleep(Duration::from_millis(700)).await;
    relayd.kill_hard();
    for f in followers {
        let _ = f.await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relayd = Relayd::start(dir.path(), &base).await;
    let followers = follow_all(relayd.socket.clone());

    // stop the server, bring it back on the same port and data
    tokio::time::sleep(Duration::from_millis(700)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = server.stop();
        (s, server)
    })
    .await
    .unwrap();
    assert!(status.0.success());
    drop(status.1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _server = ServerProcess::start(port, &["--data-dir", &data_arg]);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = flow.await.unwrap();
    assert!(acked.len() > 20, "too few messages flowed: {}", acked.len());
    // the truth: what the server stored, in order
    let far_url = format!("{base}/mcp");
    let far_again = Mcp::connect(&far_url, Some(reg["token"].as_str().unwrap()), Mode::Stateless).await;
    let history = far_again.ok("get_history", json!({"limit": 1000})).await;
    let stored: Vec<String> = history["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect();
    for text in &acked {
        assert!(stored.contains(text), "acknowledged {text:?} is not stored");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let done = panes.iter().all(|(_, v)| v.lock().unwrap().previews.len() >= stored.len());
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (pane, view) in &panes {
        let got = view.lock().unwrap().previews.clone();
        assert_eq!(got, stored, "{pane}: every stored message, once, in order");
    }
    drop(followers);
    drop(relayd);
}
