//! The REST surface relayd uses: daemon credentials, peers registered through a daemon,
//! and the per-daemon group stream.

mod support;

use serde_json::{Value, json};
use support::*;

struct Daemon {
    token: String,
}

async fn new_daemon(server: &TestServer) -> Daemon {
    let resp = reqwest::Client::new().post(server.url("/v1/daemons")).json(&json!({"hostname": "box"})).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert!(body["daemon_id"].as_str().unwrap().starts_with("d_"));
    Daemon { token: body["token"].as_str().unwrap().to_owned() }
}

impl Daemon {
    async fn register(&self, server: &TestServer, group: &str, dir: &str) -> Value {
        let resp = reqwest::Client::new()
            .post(server.url("/v1/peers"))
            .bearer_auth(&self.token)
            .json(&json!({"group_id": group, "hostname": "box", "working_directory": dir}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn events(&self, server: &TestServer, group: &str, last: Option<u64>) -> EventStream {
        EventStream::open(&server.url(&format!("/v1/groups/{group}/events")), Some(&self.token), last).await
    }
}

fn kinds_and_previews(events: &[Sse]) -> Vec<(String, String)> {
    events.iter().map(|e| (e.event.clone().unwrap(), e.data["preview"].as_str().unwrap().to_owned())).collect()
}

#[tokio::test]
async fn a_daemon_stream_carries_broadcasts_and_only_its_own_peers_dms() {
    let server = TestServer::start().await;
    let (a, b) = (new_daemon(&server).await, new_daemon(&server).await);
    let a1 = a.register(&server, "team", "/a1").await;
    let a2 = a.register(&server, "team", "/a2").await;
    let b1 = b.register(&server, "team", "/b1").await;
    let (direct, _) = server.peer("team", "/direct").await;
    assert_ne!(a1["token"], a2["token"], "each pane is its own agent");

    let mut a_events = a.events(&server, "team", None).await;
    let mut b_events = b.events(&server, "team", None).await;
    assert_eq!(a_events.status, 200);

    let a1_client = server.client(Some(a1["token"].as_str().unwrap())).await;
    a1_client.ok("send_message", json!({"message": "from a1 to all"})).await;
    direct.ok("send_dm", json!({"to": a2["peer_id"], "message": "dm to a2"})).await;
    direct.ok("send_dm", json!({"to": b1["peer_id"], "message": "dm to b1"})).await;
    a1_client.ok("send_dm", json!({"to": "box:direct", "message": "dm to direct"})).await;

    let seen_a = kinds_and_previews(&a_events.drain(SHORT).await);
    assert_eq!(seen_a, [("message".into(), "from a1 to all".into()), ("dm".into(), "dm to a2".into())]);
    let seen_b = kinds_and_previews(&b_events.drain(SHORT).await);
    assert_eq!(seen_b, [("message".into(), "from a1 to all".into()), ("dm".into(), "dm to b1".into())]);

    // membership changes reach every daemon
    a.register(&server, "team", "/a3").await;
    let joined = b_events.next(LONG).await.unwrap();
    assert_eq!(joined.event.as_deref(), Some("peer_joined"));

    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("relay_open_streams{kind=\"daemon\"} 2"), "{metrics}");
}

#[tokio::test]
async fn a_registration_says_where_to_resume_so_that_nothing_sent_to_the_peer_is_missed() {
    let server = TestServer::start().await;
    let d = new_daemon(&server).await;
    let first = d.register(&server, "team", "/first").await;
    assert_eq!(first["events_after"], 0, "a new group's log is empty");
    let (direct, _) = server.peer("team", "/direct").await;
    direct.ok("send_message", json!({"message": "before"})).await;
    let late = d.register(&server, "team", "/late").await;
    // sent after the registration, before any stream of the daemon's is open
    direct.ok("send_dm", json!({"to": late["peer_id"], "message": "early dm"})).await;
    let mut events = d.events(&server, "team", late["events_after"].as_u64()).await;
    let seen = kinds_and_previews(&events.drain(SHORT).await);
    let joined = format!("{} joined team", late["display_name"].as_str().unwrap());
    assert_eq!(seen, [("peer_joined".into(), joined), ("dm".into(), "early dm".into())]);
}

#[tokio::test]
async fn daemon_streams_resume_and_make_their_peers_online() {
    let server = TestServer::start().await;
    let d = new_daemon(&server).await;
    let pane = d.register(&server, "team", "/pane").await;
    let (sender, _) = server.peer("team", "/sender").await;
    let online = |v: &Value| v["peers"].as_array().unwrap().iter().find(|p| p["peer_id"] == pane["peer_id"]).unwrap()["online"] == true;
    assert!(!online(&sender.ok("list_peers", json!({})).await));

    let mut events = d.events(&server, "team", None).await;
    assert!(online(&sender.ok("list_peers", json!({})).await));
    sender.ok("send_message", json!({"message": "one"})).await;
    let first = events.next(LONG).await.unwrap();
    let last: u64 = first.id.unwrap().parse().unwrap();
    drop(events);
    for text in ["two", "three"] {
        sender.ok("send_message", json!({"message": text})).await;
    }
    let mut resumed = d.events(&server, "team", Some(last)).await;
    let previews: Vec<String> = kinds_and_previews(&resumed.drain(SHORT).await).into_iter().map(|(_, p)| p).collect();
    assert_eq!(previews, ["two", "three"]);

    // a one-off catch-up ends by itself once it has replayed
    let url = server.url("/v1/groups/team/events?once=true");
    let mut gap = EventStream::open(&url, Some(&d.token), Some(last)).await;
    let previews: Vec<String> = kinds_and_previews(&gap.drain(LONG).await).into_iter().map(|(_, p)| p).collect();
    assert_eq!(previews, ["two", "three"]);
    assert!(gap.ended());
}

#[tokio::test]
async fn daemon_endpoints_check_their_credentials() {
    let server = TestServer::start().await;
    let d = new_daemon(&server).await;
    let other = new_daemon(&server).await;
    let pane = d.register(&server, "team", "/pane").await;
    let http = reqwest::Client::new();

    // no token, a peer's token, a daemon with no peer in the group
    let url = server.url("/v1/groups/team/events");
    assert_eq!(EventStream::open(&url, None, None).await.status, 401);
    assert_eq!(EventStream::open(&url, Some(pane["token"].as_str().unwrap()), None).await.status, 401);
    assert_eq!(other.events(&server, "team", None).await.status, 403);
    let resp = http
        .post(server.url("/v1/peers"))
        .bearer_auth("rly_nope")
        .json(&json!({"group_id": "g", "hostname": "h", "working_directory": "/"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // bad input is a 400 with a readable error; a protected group a 403
    let resp = http
        .post(server.url("/v1/peers"))
        .bearer_auth(&d.token)
        .json(&json!({"group_id": "no spaces", "hostname": "h", "working_directory": "/"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("group_id \"no spaces\""), "{body}");
    let resp = http
        .post(server.url("/v1/peers"))
        .bearer_auth(&d.token)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let anon = server.client(None).await;
    anon.ok("register", json!({"group_id": "locked", "hostname": "h", "working_directory": "/", "join_key": "sesame seeds"})).await;
    let resp = http
        .post(server.url("/v1/peers"))
        .bearer_auth(&d.token)
        .json(&json!({"group_id": "locked", "hostname": "h", "working_directory": "/x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // only the daemon that registered a peer can remove it
    let peer_url = server.url(&format!("/v1/peers/{}", pane["peer_id"].as_str().unwrap()));
    assert_eq!(http.delete(&peer_url).bearer_auth(&other.token).send().await.unwrap().status(), 404);
    let resp = http.delete(&peer_url).bearer_auth(&d.token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let left: Value = resp.json().await.unwrap();
    assert_eq!(left["peer_id"], pane["peer_id"]);
    // with its last peer gone, the daemon has no business in the group
    assert_eq!(d.events(&server, "team", None).await.status, 403);
}

/// A daemon acts for its own peers (peers, sends, message status), and for no one else's.
#[tokio::test]
async fn a_daemon_acts_only_for_its_own_peers() {
    let server = TestServer::start().await;
    let (d, other) = (new_daemon(&server).await, new_daemon(&server).await);
    let pane = d.register(&server, "team", "/pane").await;
    let mate = other.register(&server, "team", "/mate").await;
    let (pane_id, mate_id) = (pane["peer_id"].as_str().unwrap(), mate["peer_id"].as_str().unwrap());
    let http = reqwest::Client::new();
    let as_peer = |peer: &str, rest: &str| server.url(&format!("/v1/peers/{peer}{rest}"));

    let resp = http.get(as_peer(pane_id, "/peers")).bearer_auth(&d.token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let peers: Value = resp.json().await.unwrap();
    assert_eq!(peers["peers"].as_array().unwrap().len(), 2, "{peers}");

    let resp =
        http.post(as_peer(pane_id, "/messages")).bearer_auth(&d.token).json(&json!({"message": "hi", "to": mate_id})).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let sent: Value = resp.json().await.unwrap();
    assert_eq!((sent["kind"].as_str(), sent["from"]["peer_id"].as_str()), (Some("dm"), Some(pane_id)));
    let id = sent["message_id"].as_str().unwrap();
    let status: Value =
        http.get(as_peer(pane_id, &format!("/messages/{id}"))).bearer_auth(&d.token).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["recipients"][0]["peer"]["peer_id"], mate_id, "{status}");

    // the pane's agent joined another group with the pane's token: the daemon still acts
    // for the peer in its own group only
    let agent = server.client(Some(pane["token"].as_str().unwrap())).await;
    agent.ok("register", json!({"group_id": "elsewhere", "hostname": "box", "working_directory": "/pane"})).await;
    let peers: Value = http.get(as_peer(pane_id, "/peers")).bearer_auth(&d.token).send().await.unwrap().json().await.unwrap();
    assert!(peers["peers"].as_array().unwrap().iter().all(|p| p["group_id"] == "team"), "{peers}");
    let resp =
        http.post(as_peer(pane_id, "/messages")).bearer_auth(&d.token).json(&json!({"message": "to the team"})).send().await.unwrap();
    assert_eq!(resp.status(), 200, "a broadcast needs no group to be named");
    let sent: Value = resp.json().await.unwrap();
    assert_eq!(sent["group_id"], "team");

    // the other daemon's credential is no one's for this peer: 404, nothing sent
    for resp in [
        http.get(as_peer(pane_id, "/peers")).bearer_auth(&other.token).send().await.unwrap(),
        http.post(as_peer(pane_id, "/messages")).bearer_auth(&other.token).json(&json!({"message": "forged"})).send().await.unwrap(),
        http.get(as_peer(pane_id, &format!("/messages/{id}"))).bearer_auth(&other.token).send().await.unwrap(),
    ] {
        assert_eq!(resp.status(), 404);
    }
    let resp = http
        .post(as_peer(pane_id, "/messages"))
        .bearer_auth(pane["token"].as_str().unwrap())
        .json(&json!({"message": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "a peer's token is not a daemon's");
    // bad input: too long, an unknown recipient, a message not there
    let long = "x".repeat(1 << 20);
    let resp = http.post(as_peer(pane_id, "/messages")).bearer_auth(&d.token).json(&json!({"message": long})).send().await.unwrap();
    assert!(resp.status() == 400 || resp.status() == 413, "{}", resp.status());
    let resp =
        http.post(as_peer(pane_id, "/messages")).bearer_auth(&d.token).json(&json!({"message": "x", "to": "nobody"})).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = http.get(as_peer(pane_id, "/messages/m_nothing")).bearer_auth(&d.token).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let history = server.client(Some(mate["token"].as_str().unwrap())).await.ok("get_history", json!({})).await;
    let texts: Vec<&str> = history["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert!(!texts.contains(&"forged"), "{texts:?}");
}

/// A daemon registers its own peers again (the same peer comes back); another daemon
/// naming the same host and directory gets no one's peer, and its stream no one's DMs.
#[tokio::test]
async fn a_daemon_cannot_take_over_another_daemons_peer() {
    let server = TestServer::start().await;
    let (owner, thief) = (new_daemon(&server).await, new_daemon(&server).await);
    let peer = owner.register(&server, "team", "/api").await;
    assert_eq!(owner.register(&server, "team", "/api").await["peer_id"], peer["peer_id"], "its own daemon gets it back");
    let resp = reqwest::Client::new()
        .post(server.url("/v1/peers"))
        .bearer_auth(&thief.token)
        .json(&json!({"group_id": "team", "hostname": "box", "working_directory": "/api"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    assert!(resp.text().await.unwrap().contains("already a peer of group"));
    let thief_stream = thief.events(&server, "team", None).await;
    assert_eq!(thief_stream.status, 403, "a daemon with no peer in the group has no stream of it");
}

/// Membership is the right to a daemon's group stream for as long as the stream lasts, not
/// only when it opens: the stream ends once the daemon's last peer in the group is gone.
#[tokio::test]
async fn a_daemon_stream_ends_with_its_last_peer_in_the_group() {
    let server = TestServer::start().await;
    let d = new_daemon(&server).await;
    let (one, two) = (d.register(&server, "team", "/one").await, d.register(&server, "team", "/two").await);
    let (other, _) = server.peer("team", "/other").await;
    let mut stream = d.events(&server, "team", None).await;
    let http = reqwest::Client::new();
    let remove = |peer: &Value| http.delete(server.url(&format!("/v1/peers/{}", peer["peer_id"].as_str().unwrap()))).bearer_auth(&d.token);

    assert_eq!(remove(&one).send().await.unwrap().status(), 200);
    other.ok("send_message", json!({"message": "still yours"})).await;
    let seen = kinds_and_previews(&stream.drain(SHORT).await);
    assert_eq!(seen, [("peer_left".into(), "box:one left team".into()), ("message".into(), "still yours".into())]);

    assert_eq!(remove(&two).send().await.unwrap().status(), 200);
    other.ok("send_message", json!({"message": "not for you any more"})).await;
    let seen = kinds_and_previews(&stream.drain(SHORT).await);
    assert_eq!(seen, [("peer_left".into(), "box:two left team".into())]);
    assert!(stream.ended(), "the stream ends after the last peer's leave");
}

/// `POST /v1/peers` as `daemon`, from `client` by way of a trusted proxy.
async fn register_from(server: &TestServer, daemon: &Daemon, client: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url("/v1/peers"))
        .bearer_auth(&daemon.token)
        .header("x-forwarded-for", format!("203.0.113.250, {client}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn new_peers_are_limited_per_client_address_and_known_ones_are_not() {
    let server = TestServer::start_with(|c| {
        c.registrations_per_minute = 3;
        c.trust_forwarded_for = true;
    })
    .await;
    let daemon = new_daemon(&server).await;
    let peer = |dir: &str| json!({"group_id": "team", "hostname": "box", "working_directory": dir});
    for i in 0..3 {
        assert_eq!(register_from(&server, &daemon, "198.51.100.7", peer(&format!("/p{i}"))).await.status(), 200);
    }
    let refused = register_from(&server, &daemon, "198.51.100.7", peer("/p3")).await;
    assert_eq!(refused.status(), 429);
    let why = refused.text().await.unwrap();
    assert!(why.contains("too many new peers from your address") && why.contains("retry in"), "{why}");
    // the same peer again is no new peer; another address has its own allowance; and the
    // proxy's own entry, not the client's first word, is the address that counts
    assert_eq!(register_from(&server, &daemon, "198.51.100.7", peer("/p0")).await.status(), 200);
    assert_eq!(register_from(&server, &daemon, "198.51.100.8", peer("/p3")).await.status(), 200);
    // behind the trusted proxy, a request without the header is from an unknown client, which
    // is limited too (not taken for the proxy's own loopback address)
    for i in 0..3 {
        daemon.register(&server, "team", &format!("/unknown{i}")).await;
    }
    let bare = |dir: &str| reqwest::Client::new().post(server.url("/v1/peers")).bearer_auth(&daemon.token).json(&peer(dir)).send();
    assert_eq!(bare("/unknown3").await.unwrap().status(), 429);

    // with no proxy trusted, this machine's own agents (loopback) are not limited
    let local = TestServer::start_with(|c| c.registrations_per_minute = 3).await;
    let daemon = new_daemon(&local).await;
    for i in 0..5 {
        daemon.register(&local, "team", &format!("/local{i}")).await;
    }
}

#[tokio::test]
async fn a_join_key_guesser_is_slowed_down_and_members_still_get_in() {
    let server = TestServer::start_with(|c| c.trust_forwarded_for = true).await;
    let daemon = new_daemon(&server).await;
    let join = |dir: &str, key: &str| json!({"group_id": "locked", "hostname": "box", "working_directory": dir, "join_key": key});
    assert_eq!(register_from(&server, &daemon, "198.51.100.1", join("/owner", "the right key")).await.status(), 200);
    for i in 0..10 {
        let wrong = register_from(&server, &daemon, "198.51.100.66", join(&format!("/g{i}"), &format!("guess number {i}"))).await;
        assert_eq!(wrong.status(), 403, "guess {i}");
    }
    let stopped = register_from(&server, &daemon, "198.51.100.66", join("/g10", "the right key")).await;
    assert_eq!(stopped.status(), 429);
    let why = stopped.text().await.unwrap();
    assert!(why.contains("too many wrong join keys") && why.contains("locked"), "{why}");
    // a member from elsewhere is not locked out
    assert_eq!(register_from(&server, &daemon, "198.51.100.2", join("/member", "the right key")).await.status(), 200);
}
