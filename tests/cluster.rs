//! relay-server as a cluster: two real relay-server processes on a real three-node NATS
//! JetStream cluster. A client may reach either node; every node serves everyone.

use std::time::Duration;

use relay_e2e::ServerProcess;
use relay_e2e::mcp::{Client, Mode};
use relay_e2e::nats::NatsCluster;
use relay_e2e::sse::{EventStream, Sse};
use serde_json::{Value, json};

struct Cluster {
    nodes: Vec<ServerProcess>,
    _nats: NatsCluster,
}

impl Cluster {
    fn start(test: &str, relay_nodes: usize) -> Option<Self> {
        let nats = NatsCluster::start(test, 3)?;
        let urls = nats.urls();
        let nodes = (0..relay_nodes)
            .map(|_| ServerProcess::start(0, &["--nats", &urls, "--rate-burst", "10000", "--rate-per-second", "10000"]))
            .collect();
        Some(Self { nodes, _nats: nats })
    }

    fn mcp(&self, node: usize) -> String {
        self.nodes[node].url("/mcp")
    }

    /// Registers a peer through `node`: its client there, and what register answered.
    async fn peer(&self, node: usize, group: &str, dir: &str) -> (Client, Value) {
        let anon = Client::connect(&self.mcp(node), None, Mode::Stateless).await;
        let reg = anon.ok("register", json!({"group_id": group, "hostname": "box", "working_directory": dir})).await;
        let token = reg["token"].as_str().expect("a token").to_owned();
        (Client::connect(&self.mcp(node), Some(&token), Mode::Stateless).await, reg)
    }

    /// A peer's own event stream, opened on `node`.
    async fn events(&self, node: usize, reg: &Value, last: Option<u64>) -> EventStream {
        let path = format!("/notifications/{}/{}", reg["group_id"].as_str().unwrap(), reg["peer_id"].as_str().unwrap());
        let stream = EventStream::open(&self.nodes[node].url(&path), reg["token"].as_str(), last).await;
        assert_eq!(stream.status, 200);
        stream
    }
}

/// The next message (broadcast or DM) on `stream`, skipping membership and receipts.
async fn next_message(stream: &mut EventStream) -> Sse {
    loop {
        let event = stream.next(Duration::from_secs(10)).await.expect("a message within 10 s");
        if matches!(event.event.as_deref(), Some("message" | "dm")) {
            return event;
        }
    }
}

/// What a peer's stream shows of a message (peers get a preview; the text is in the inbox).
fn preview(event: &Sse) -> &str {
    event.data["preview"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_anyone_and_streams_resume_on_another_node() {
    let Some(cluster) = Cluster::start("cluster::any_node_serves_anyone", 2) else { return };
    let (alice, a) = cluster.peer(0, "team", "/src/alice").await;
    let (bob, b) = cluster.peer(1, "team", "/src/bob").await;

    // bob listens on node 2; alice sends through node 1
    let mut on_two = cluster.events(1, &b, None).await;
    let sent = alice.ok("send_message", json!({"message": "hello from node 1"})).await;
    assert_eq!(sent["recipients"], 1);
    let heard = next_message(&mut on_two).await;
    assert_eq!(preview(&heard), "hello from node 1");
    assert_eq!(heard.id.as_deref().and_then(|id| id.parse::<u64>().ok()), sent["seq"].as_u64());

    // presence is the cluster's: node 1 sees bob online through node 2's stream
    let peers = alice.ok("list_peers", json!({})).await;
    let bob_row = peers["peers"].as_array().unwrap().iter().find(|p| p["peer_id"] == b["peer_id"]).cloned().unwrap();
    assert_eq!(bob_row["online"], true, "{peers}");

    // bob drops off; what he misses he gets from node 1, by the same id
    let last = heard.id.unwrap().parse::<u64>().unwrap();
    drop(on_two);
    for i in 0..3 {
        alice.ok("send_message", json!({"message": format!("missed {i}")})).await;
    }
    let mut on_one = cluster.events(0, &b, Some(last)).await;
    for i in 0..3 {
        assert_eq!(preview(&next_message(&mut on_one).await), format!("missed {i}"));
    }
    // and live again, from node 2's sender this time
    bob.ok("send_dm", json!({"to": a["peer_id"], "message": "thanks"})).await;
    alice.ok("send_message", json!({"message": "after the resume"})).await;
    assert_eq!(preview(&next_message(&mut on_one).await), "after the resume");

    // the inbox, history and receipts agree whichever node answers
    let inbox = bob.ok("read_new_messages", json!({})).await;
    let read: Vec<&str> = inbox["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(read, ["hello from node 1", "missed 0", "missed 1", "missed 2", "after the resume"]);
    let texts = |history: &Value| -> Vec<String> {
        history["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect()
    };
    let history = alice.ok("get_history", json!({"limit": 10})).await;
    assert_eq!(texts(&history), ["hello from node 1", "missed 0", "missed 1", "missed 2", "after the resume"]);
    let alice_on_two = Client::connect(&cluster.mcp(1), a["token"].as_str(), Mode::Stateless).await;
    assert_eq!(alice_on_two.ok("get_history", json!({"limit": 10})).await["messages"], history["messages"]);
    let thread = alice_on_two.ok("get_history", json!({"with_peer": b["peer_id"], "filter": "than"})).await;
    assert_eq!(texts(&thread), ["thanks"]);
    let status = alice.ok("message_status", json!({"message_id": sent["message_id"]})).await;
    assert_eq!(status["recipients"][0]["state"], "read", "{status}");

    for node in &cluster.nodes {
        let health = reqwest::get(node.url("/healthz")).await.unwrap();
        assert_eq!(health.status(), 200);
    }
}
