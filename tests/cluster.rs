//! relay-server as a cluster: two real relay-server processes on a real three-node NATS
//! JetStream cluster. A client may reach either node; every node serves everyone.

use std::time::{Duration, Instant};

use relay_e2e::ServerProcess;
use relay_e2e::mcp::{Client, Mode, call_once};
use relay_e2e::nats::NatsCluster;
use relay_e2e::proxy::Proxy;
use relay_e2e::sse::{EventStream, Sse};
use serde_json::{Value, json};

struct Cluster {
    nodes: Vec<ServerProcess>,
    nats: NatsCluster,
}

impl Cluster {
    /// A three-node NATS cluster and `relay_nodes` relay-servers on it, with send limits
    /// out of the way.
    fn start(test: &str, relay_nodes: usize) -> Option<Self> {
        Self::start_with(test, relay_nodes, &["--rate-burst", "10000", "--rate-per-second", "10000"])
    }

    fn start_with(test: &str, relay_nodes: usize, args: &[&str]) -> Option<Self> {
        let nats = NatsCluster::start(test, 3)?;
        let urls = nats.urls();
        let nodes = (0..relay_nodes).map(|_| ServerProcess::start(0, &[&["--nats", &urls], args].concat())).collect();
        Some(Self { nodes, nats })
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

/// The texts of the messages a tool answered with (an inbox, a history).
fn message_texts(reply: &Value) -> Vec<String> {
    let messages = reply["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
    messages.iter().map(|m| m["text"].as_str().unwrap_or_default().to_owned()).collect()
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
    let history = alice.ok("get_history", json!({"limit": 10})).await;
    assert_eq!(message_texts(&history), ["hello from node 1", "missed 0", "missed 1", "missed 2", "after the resume"]);
    let alice_on_two = Client::connect(&cluster.mcp(1), a["token"].as_str(), Mode::Stateless).await;
    assert_eq!(alice_on_two.ok("get_history", json!({"limit": 10})).await["messages"], history["messages"]);
    let thread = alice_on_two.ok("get_history", json!({"with_peer": b["peer_id"], "filter": "than"})).await;
    assert_eq!(message_texts(&thread), ["thanks"]);
    let status = alice.ok("message_status", json!({"message_id": sent["message_id"]})).await;
    assert_eq!(status["recipients"][0]["state"], "read", "{status}");

    for node in &cluster.nodes {
        let health = reqwest::get(node.url("/healthz")).await.unwrap();
        assert_eq!(health.status(), 200);
    }
}

/// Reads `want` messages from a peer's stream at `url`, reconnecting with `Last-Event-ID`
/// whenever the stream ends or cannot open: (SSE id, preview) of each, as they came.
async fn read_through(url: String, token: String, want: usize) -> (Vec<(u64, String)>, usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut got, mut last, mut opened) = (Vec::new(), None, 0);
    while got.len() < want {
        assert!(Instant::now() < deadline, "{url}: {} of {want} messages after 3 minutes", got.len());
        let stream = EventStream::try_open(&url, Some(&token), last).await;
        let Some(mut stream) = stream.ok().filter(|s| s.status == 200) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        opened += 1;
        while got.len() < want {
            let Some(event) = stream.next(Duration::from_secs(20)).await else { break };
            if !matches!(event.event.as_deref(), Some("message" | "dm")) {
                continue;
            }
            let seq: u64 = event.id.as_deref().and_then(|id| id.parse().ok()).expect("messages carry their sequence number");
            got.push((seq, preview(&event).to_owned()));
            last = Some(seq);
        }
    }
    (got, opened)
}

/// Attaches a pane to relayd's group "load" and reads its events until `want` messages
/// came: (sequence number, preview) of each.
async fn read_pane(socket: std::path::PathBuf, want: usize) -> Vec<(u64, String)> {
    use relay_local::client::Client as Local;
    use relay_proto::local::{AttachRequest, Reply, Request};
    relay_e2e::wait_until("relayd's socket", Duration::from_secs(20), || socket.exists());
    let attach = AttachRequest { pane: "%7".into(), group: "load".into(), working_directory: "/src/pane".into(), ..Default::default() };
    let mut control = Local::connect(&socket, "cluster-test").await.expect("relayd's socket");
    let reply = control.request(&Request::Attach(attach)).await.expect("attach");
    assert!(matches!(reply, Reply::Attached { .. }), "attach: {reply:?}");
    let mut events = Local::connect(&socket, "cluster-test").await.expect("relayd's socket");
    let reply = events.request(&Request::Subscribe { pane: "%7".into(), since: Default::default() }).await.expect("subscribe");
    assert!(matches!(reply, Reply::Subscribed { .. }), "subscribe: {reply:?}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut got = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = tokio::time::timeout(left, events.next()).await;
        let reply =
            reply.unwrap_or_else(|_| panic!("relayd's pane: {} of {want} messages after 3 minutes", got.len())).expect("relayd's socket");
        if let Reply::Event { event, .. } = reply
            && event.kind == relay_proto::EventKind::Message
        {
            got.push((event.seq, event.preview));
        }
    }
    got
}

/// Sends until the relay says sent, retrying a failure with the same idempotency key;
/// returns how many tries failed.
async fn send_surely(http: &reqwest::Client, url: &str, token: &str, text: &str, key: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failures = 0;
    loop {
        match call_once(http, url, Some(token), "send_message", json!({"message": text, "idempotency_key": key})).await {
            Ok(sent) if sent["message_id"].is_string() => return failures,
            Ok(odd) => panic!("send_message answered {odd}"),
            Err(e) => {
                assert!(Instant::now() < deadline, "{text} not sent after a minute: {e}");
                failures += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A group under load through the proxy: `TOTAL` messages from one sender while two peers
/// listen through the proxy; `disrupt` runs before message `i` is sent. Every listener
/// must see every message once, in order, and its inbox must agree.
async fn under_load(test: &str, disrupt: impl Fn(usize, &mut Cluster)) {
    const TOTAL: usize = 5_000;
    // one load at a time: two of them at once on two cores measure the machine, not relay
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(mut cluster) = Cluster::start(test, 3) else { return };
    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.addr).collect();
    let Some(proxy) = Proxy::start(test, &addrs) else { return };
    let http = reqwest::Client::new();
    let mcp = proxy.url("/mcp");
    let register = |dir: &str| {
        let args = json!({"group_id": "load", "hostname": "box", "working_directory": dir});
        let (http, mcp) = (http.clone(), mcp.clone());
        async move { call_once(&http, &mcp, None, "register", args).await.expect("register through the proxy") }
    };
    let alice = register("/src/alice").await;
    let mut readers = Vec::new();
    for dir in ["/src/bob", "/src/carol"] {
        let reg = register(dir).await;
        let url = proxy.url(&format!("/notifications/load/{}", reg["peer_id"].as_str().unwrap()));
        readers.push((reg.clone(), tokio::spawn(read_through(url, reg["token"].as_str().unwrap().to_owned(), TOTAL))));
    }
    // and a relayd on this machine, its pane in the group, reaching the cluster through the proxy
    let relayd_home = tempfile::tempdir().unwrap();
    let (_relayd, socket) =
        relay_e2e::spawn_relayd(relayd_home.path(), &proxy.url(""), &["--no-notifications"], &[], std::process::Stdio::null());
    let pane = tokio::spawn(read_pane(socket, TOTAL));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let token = alice["token"].as_str().unwrap();
    let mut failures = 0;
    for i in 0..TOTAL {
        disrupt(i, &mut cluster);
        failures += send_surely(&http, &mcp, token, &format!("m{i}"), &format!("k{i}")).await;
    }
    eprintln!("{test}: {TOTAL} sent through the proxy; {failures} tries failed and were retried");

    let expected: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    let got = pane.await.unwrap();
    assert!(got.iter().map(|(_, p)| p).eq(expected.iter()), "relayd's pane saw the messages out of order or twice");
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "ids rise");
    eprintln!("{test}: relayd's pane saw every message once, in order");
    for (reg, reader) in readers {
        let (got, opened) = reader.await.unwrap();
        let previews: Vec<&String> = got.iter().map(|(_, p)| p).collect();
        assert_eq!(previews.len(), TOTAL);
        assert!(previews.iter().zip(&expected).all(|(a, b)| *a == b), "{} saw the messages out of order or twice", reg["peer_id"]);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "ids rise");
        eprintln!("{test}: {} saw every message once, in order, over {opened} connection(s)", reg["peer_id"]);
        // the inbox agrees with the stream
        let mut inbox = Vec::new();
        loop {
            let read = call_once(&http, &mcp, reg["token"].as_str(), "read_new_messages", json!({})).await.expect("read");
            let page = message_texts(&read);
            if page.is_empty() {
                break;
            }
            inbox.extend(page);
        }
        assert_eq!(inbox, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_relay_node_and_a_nats_node_mid_load_loses_nothing() {
    under_load("cluster::killing_nodes_mid_load", |i, cluster| {
        if i == 1_000 {
            cluster.nodes[0].kill_hard();
        }
        if i == 2_500 {
            cluster.nats.kill(1);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_relay_node_under_load_loses_nothing() {
    let urls = std::sync::OnceLock::new();
    under_load("cluster::rolling_restart", |i, cluster| {
        let urls = urls.get_or_init(|| cluster.nats.urls());
        if i > 0 && i % 1_200 == 0 && i / 1_200 <= cluster.nodes.len() {
            let n = i / 1_200 - 1;
            let port = cluster.nodes[n].addr.port();
            assert!(cluster.nodes[n].stop().success(), "node {n} stops cleanly");
            cluster.nodes[n] = ServerProcess::start(port, &["--nats", urls, "--rate-burst", "10000", "--rate-per-second", "10000"]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_nats_quorum_sends_fail_plainly_and_nothing_is_lost() {
    let Some(mut cluster) = Cluster::start("cluster::no_quorum", 1) else { return };
    let (alice, _) = cluster.peer(0, "q", "/src/alice").await;
    let (bob, _) = cluster.peer(0, "q", "/src/bob").await;
    alice.ok("send_message", json!({"message": "before"})).await;
    cluster.nats.kill(1);
    cluster.nats.kill(2);
    let err = alice.err("send_message", json!({"message": "during", "idempotency_key": "d1"})).await;
    eprintln!("without quorum: {err}");
    assert!(err.contains("NATS") || err.contains("JetStream"), "the error says what is missing: {err}");
    // a node without JetStream says so (once NATS has noticed the loss)
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::get(cluster.nodes[0].url("/healthz")).await.unwrap().status() != 503 {
        assert!(Instant::now() < deadline, "/healthz still says ok without a NATS quorum");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.nats.start_node(1);
    cluster.nats.start_node(2);
    // once NATS is back the same send goes through, once
    let deadline = Instant::now() + Duration::from_secs(60);
    let sent = loop {
        let result = alice.call("send_message", json!({"message": "during", "idempotency_key": "d1"})).await;
        if result.is_error != Some(true) {
            break result.structured_content.unwrap();
        }
        assert!(Instant::now() < deadline, "sends never came back: {}", relay_e2e::mcp::text(&result));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("after quorum returned: repeated={}", sent["repeated"]);
    // (the buckets' own leaders may take a moment longer to come back than the log's)
    let inbox = loop {
        let result = bob.call("read_new_messages", json!({})).await;
        if result.is_error != Some(true) {
            break result.structured_content.unwrap();
        }
        assert!(Instant::now() < deadline, "reads never came back: {}", relay_e2e::mcp::text(&result));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(message_texts(&inbox), ["before", "during"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_send_limit_holds_across_nodes() {
    let Some(cluster) = Cluster::start_with("cluster::send_limit", 2, &["--rate-burst", "5", "--rate-per-second", "0.01"]) else {
        return;
    };
    let (on_one, a) = cluster.peer(0, "limits", "/src/alice").await;
    cluster.peer(1, "limits", "/src/bob").await;
    let on_two = Client::connect(&cluster.mcp(1), a["token"].as_str(), Mode::Stateless).await;
    for i in 0..5 {
        let node = if i % 2 == 0 { &on_one } else { &on_two };
        node.ok("send_message", json!({"message": format!("burst {i}")})).await;
    }
    // the burst is spent on both nodes together, not on each
    for node in [&on_one, &on_two] {
        let err = node.err("send_message", json!({"message": "one too many"})).await;
        assert!(err.contains("rate") || err.contains("too many"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_racing_through_two_nodes_make_one_peer_per_agent_and_distinct_names() {
    const ROUNDS: usize = 12;
    let Some(cluster) = Cluster::start("cluster::registration_race", 2) else { return };
    let http = reqwest::Client::new();
    let register = |node: usize, dir: String, name: &'static str| {
        let (http, url) = (http.clone(), cluster.mcp(node));
        tokio::spawn(async move {
            let args = json!({"group_id": "race", "hostname": "box", "working_directory": dir, "name": name});
            call_once(&http, &url, None, "register", args).await
        })
    };
    for round in 0..ROUNDS {
        // the same agent through both nodes at once: one peer, the other call refused
        let same = [register(0, format!("/src/same{round}"), "same"), register(1, format!("/src/same{round}"), "same")];
        // two agents asking for one name at once: two peers, two names
        let named = [register(0, format!("/src/a{round}"), "worker"), register(1, format!("/src/b{round}"), "worker")];
        let mut made = Vec::new();
        for call in same.into_iter().chain(named) {
            made.push(call.await.unwrap());
        }
        let refused = made[..2].iter().filter(|r| r.as_ref().is_err_and(|e| e.contains("already"))).count();
        assert_eq!(refused, 1, "round {round}: {made:?}");
        assert!(made[2..].iter().all(Result::is_ok), "round {round}: {made:?}");
    }
    let (viewer, _) = cluster.peer(0, "race", "/src/viewer").await;
    let peers = viewer.ok("list_peers", json!({})).await;
    let peers = peers["peers"].as_array().unwrap();
    let mut names: Vec<&str> = peers.iter().map(|p| p["display_name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 1 + ROUNDS * 3, "{names:?}");
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 1 + ROUNDS * 3, "names are distinct: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_peers_from_one_address_are_limited_across_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "trust_forwarded_for = true\nregistrations_per_minute = 4\n").unwrap();
    let Some(cluster) = Cluster::start_with("cluster::registration_limit", 2, &["--config", config.to_str().unwrap()]) else { return };
    // one client, behind a proxy that says where it is, reaching either node
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let http = reqwest::Client::builder().default_headers(headers).build().unwrap();
    let register = |node: usize, i: usize| {
        let (http, url) = (http.clone(), cluster.mcp(node));
        let args = json!({"group_id": "limited", "hostname": "box", "working_directory": format!("/src/a{i}")});
        async move { call_once(&http, &url, None, "register", args).await }
    };
    for i in 0..4 {
        register(i % 2, i).await.expect("within the limit");
    }
    // the four a minute are spent on both nodes together, not on each
    for node in 0..2 {
        let err = register(node, 10 + node).await.unwrap_err();
        assert!(err.contains("too many new peers from your address"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_join_keys_are_counted_across_nodes_and_right_ones_are_not() {
    const RIGHT: &str = "right horse battery";
    let Some(cluster) = Cluster::start("cluster::wrong_keys", 2) else { return };
    let http = reqwest::Client::new();
    let register = |node: usize, dir: String, key: &str| {
        let (http, url) = (http.clone(), cluster.mcp(node));
        let args = json!({"group_id": "locked", "hostname": "box", "working_directory": dir, "join_key": key});
        async move { call_once(&http, &url, None, "register", args).await }
    };
    register(0, "/src/owner".into(), RIGHT).await.expect("creates the group");
    // right keys, through both nodes, do not count
    for i in 0..12 {
        register(i % 2, format!("/src/member{i}"), RIGHT).await.expect("a right key");
    }
    // ten wrong ones a minute from this address, through both nodes together
    for i in 0..10 {
        let err = register(i % 2, format!("/src/guess{i}"), "a wrong guess").await.unwrap_err();
        assert!(err.contains("wrong join key"), "{err}");
    }
    for node in 0..2 {
        let err = register(node, "/src/late".into(), RIGHT).await.unwrap_err();
        assert!(err.contains("too many wrong join keys"), "node {node}: {err}");
    }
}

/// Reads a response body until `want` shows up in it (or 10 s pass): what came.
async fn body_until(mut resp: reqwest::Response, want: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(want) {
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Ok(Ok(Some(chunk))) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    seen
}

/// The console in a cluster: a human signs in through one node, reads the page on another
/// and the live stream on a third; what agents and the human say crosses nodes both ways,
/// and signing out through one node ends the session on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_whichever_node_each_request_reaches() {
    let Some(cluster) = Cluster::start("cluster::console", 3) else { return };
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let url = |node: usize, path: &str| cluster.nodes[node].url(path);
    let origin = |node: usize| format!("http://{}", cluster.nodes[node].addr);
    let post_json = |node: usize, path: &str, token: &str, body: Value| http.post(url(node, path)).bearer_auth(token).json(&body).send();

    // a relayd's credential, and an agent of it
    let daemon: Value = http.post(url(0, "/v1/daemons")).json(&json!({"hostname": "box"})).send().await.unwrap().json().await.unwrap();
    let daemon = daemon["token"].as_str().unwrap().to_owned();
    let agent = json!({"group_id": "watch", "hostname": "box", "working_directory": "/api", "name": "api"});
    let agent: Value = post_json(0, "/v1/peers", &daemon, agent).await.unwrap().json().await.unwrap();
    let agent = agent["peer_id"].as_str().unwrap().to_owned();

    // the link is made by node 0 and used on node 1
    let link: Value = post_json(0, "/v1/console/sign-in", &daemon, json!({"name": "ann"})).await.unwrap().json().await.unwrap();
    let signed_in = http.post(url(1, link["path"].as_str().unwrap())).header("origin", origin(1)).send().await.unwrap();
    assert_eq!(signed_in.status(), 303, "the link works on another node");
    let cookie = signed_in.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();

    // the page from node 2, its live stream from node 1
    let page = http.get(url(2, "/console/g/watch")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    let attribute = |name: &str| page.split(&format!("{name}=\"")).nth(1).unwrap().split('"').next().unwrap().to_owned();
    let (csrf, head) = (attribute("name=\"csrf\" value"), attribute("data-head"));
    let stream = http.get(url(1, &format!("/console/g/watch/events?after={head}"))).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(stream.status(), 200);

    // the agent speaks through node 2; the human sees it live through node 1
    let said = post_json(2, &format!("/v1/peers/{agent}/messages"), &daemon, json!({"message": "built on node 2"})).await.unwrap();
    assert_eq!(said.status(), 200);
    let seen = body_until(stream, "built on node 2").await;
    assert!(seen.contains("built on node 2"), "{seen}");

    // the human answers through node 0; the agent's daemon hears it on node 1, from a human
    let mut agent_stream = EventStream::open(&url(1, "/v1/groups/watch/events"), Some(&daemon), None).await;
    // (the token and the id are URL-safe as they are)
    let form = format!("csrf={csrf}&text=thanks%2C+from+ann&to={agent}");
    let answer = http
        .post(url(0, "/console/g/watch/send"))
        .header("cookie", &cookie)
        .header("origin", origin(0))
        .header("accept", "application/json")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let dm = loop {
        let event = agent_stream.next(Duration::from_secs(10)).await.expect("the human's DM reaches the agent's daemon");
        if event.event.as_deref() == Some("dm") {
            break event;
        }
    };
    assert_eq!((dm.data["text"].as_str(), dm.data["sender_kind"].as_str()), (Some("thanks, from ann"), Some("human")));

    // signing out everywhere through node 2 ends the session on every node
    let out = post_json(2, "/v1/console/sign-out-everywhere", &daemon, json!({})).await.unwrap();
    assert_eq!(out.status(), 200);
    for node in 0..3 {
        let after = http.get(url(node, "/console/g/watch")).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(after.status(), 401, "node {node} still took the session");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_reading_one_inbox_at_once_never_return_a_message_twice() {
    const SENT: usize = 200;
    let Some(cluster) = Cluster::start("cluster::concurrent_reads", 2) else { return };
    let (alice, _) = cluster.peer(0, "reads", "/src/alice").await;
    let (_, b) = cluster.peer(1, "reads", "/src/bob").await;
    for i in 0..SENT {
        alice.ok("send_message", json!({"message": format!("r{i}")})).await;
    }
    let readers = (0..2).map(|node| {
        let (url, token) = (cluster.mcp(node), b["token"].as_str().unwrap().to_owned());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut got = Vec::new();
            loop {
                let read = call_once(&http, &url, Some(&token), "read_new_messages", json!({"limit": 7})).await.expect("read");
                let page = message_texts(&read);
                if page.is_empty() && read["more"] != true {
                    return got;
                }
                got.extend(page);
            }
        })
    });
    let mut all: Vec<String> = Vec::new();
    for reader in readers.collect::<Vec<_>>() {
        let got = reader.await.unwrap();
        eprintln!("one reader got {} messages", got.len());
        all.extend(got);
    }
    all.sort_by_key(|t| t[1..].parse::<usize>().unwrap());
    assert_eq!(all, (0..SENT).map(|i| format!("r{i}")).collect::<Vec<_>>(), "each message exactly once between the two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_passes_its_interop_run_through_a_proxy_in_both_modes() {
    let test = "cluster::python_interop";
    let Some(python) = relay_e2e::python_with_mcp(test) else { return };
    let Some(cluster) = Cluster::start(test, 2) else { return };
    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.addr).collect();
    let Some(proxy) = Proxy::start(test, &addrs) else { return };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/interop.py");
    for mode in ["auto", "legacy"] {
        let out = std::process::Command::new(&python).arg(script).arg(proxy.url("")).arg(mode).output().expect("run python");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "python interop ({mode}) through the cluster failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains(&format!("ok: python mcp interop, mode={mode}")), "{stdout}");
    }
}

/// Runs `relay-server` with `args` to completion: (success, stdout and stderr).
fn relay_server(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(relay_e2e::binary("relay-server"))
        .args(args)
        .env_remove("RELAY_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run relay-server");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_servers_data_moves_into_a_cluster_and_clients_resume() {
    let test = "cluster::migrate";
    let Some(nats) = NatsCluster::start(test, 3) else { return };
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_str().unwrap();

    // a single server on SQLite, used for a while
    let mut single = ServerProcess::start(0, &["--data-dir", dir]);
    let anon = Client::connect(&single.url("/mcp"), None, Mode::Stateless).await;
    let alice = anon.ok("register", json!({"group_id": "old", "hostname": "box", "working_directory": "/src/alice"})).await;
    let bob = anon.ok("register", json!({"group_id": "old", "hostname": "box", "working_directory": "/src/bob"})).await;
    let (a, b) = (alice["token"].as_str().unwrap(), bob["token"].as_str().unwrap());
    let alice_client = Client::connect(&single.url("/mcp"), Some(a), Mode::Stateless).await;
    let bob_client = Client::connect(&single.url("/mcp"), Some(b), Mode::Stateless).await;
    let first = alice_client.ok("send_message", json!({"message": "one", "idempotency_key": "k1"})).await;
    alice_client.ok("send_message", json!({"message": "two"})).await;
    assert_eq!(bob_client.ok("read_new_messages", json!({})).await["messages"].as_array().unwrap().len(), 2);
    let dm = alice_client.ok("send_dm", json!({"to": bob["peer_id"], "message": "three"})).await;
    alice_client.ok("send_message", json!({"message": "four"})).await;
    // bob's stream had seen up to "two" when the server stopped
    let seen_two = first["seq"].as_u64().unwrap() + 1;
    drop((alice_client, bob_client, anon));
    assert!(single.stop().success());

    let (ok, out) = relay_server(&["migrate", "--from", dir, "--to", &nats.urls()]);
    assert!(ok, "migrate failed: {out}");
    assert!(out.contains("copied 1 group(s), 6 entries, 2 peer(s), 2 token(s)"), "{out}");
    // only into an empty cluster
    let (ok, out) = relay_server(&["migrate", "--from", dir, "--to", &nats.urls()]);
    assert!(!ok && out.contains("empty one only"), "{out}");

    let node = ServerProcess::start(0, &["--nats", &nats.urls()]);
    let alice_client = Client::connect(&node.url("/mcp"), Some(a), Mode::Stateless).await;
    let bob_client = Client::connect(&node.url("/mcp"), Some(b), Mode::Stateless).await;
    alice_client.ok("send_message", json!({"message": "five"})).await;
    // the old tokens, the read cursor and the idempotency keys came along
    let unread = message_texts(&bob_client.ok("read_new_messages", json!({})).await);
    assert_eq!(unread, ["three", "four", "five"]);
    let again = alice_client.ok("send_message", json!({"message": "one", "idempotency_key": "k1"})).await;
    assert_eq!((again["repeated"].as_bool(), &again["message_id"]), (Some(true), &first["message_id"]));
    let status = alice_client.ok("message_status", json!({"message_id": dm["message_id"]})).await;
    assert_eq!(status["recipients"][0]["state"], "read", "{status}");
    // a stream resumed from an id the single server gave gets exactly what it missed
    let path = format!("/notifications/old/{}", bob["peer_id"].as_str().unwrap());
    let mut stream = EventStream::open(&node.url(&path), Some(b), Some(seen_two)).await;
    for text in ["three", "four", "five"] {
        assert_eq!(preview(&next_message(&mut stream).await), text);
    }

    // and the cluster checks out
    let (ok, out) = relay_server(&["cluster", "check", "--nats", &nats.urls()]);
    assert!(ok, "{out}");
    assert!(out.contains("ok   stream RELAY_LOG: 3 replica(s), 3 wanted; 7 message(s)"), "{out}");
    assert!(out.contains("stream RELAY_LOG: keeps messages forever") && out.contains("ok   bucket relay_console: 3 replica(s)"), "{out}");
}
