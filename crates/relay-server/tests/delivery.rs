//! Delivery states: what a sender can learn about each recipient's copy of its message,
//! from daemons' receipts and from the recipient's own reads, and the receipt events that
//! tell the sender as it happens.

mod support;

use serde_json::{Value, json};
use support::*;

async fn new_daemon(server: &TestServer) -> String {
    let resp = reqwest::Client::new().post(server.url("/v1/daemons")).json(&json!({"hostname": "box"})).send().await.unwrap();
    let body: Value = resp.json().await.unwrap();
    body["token"].as_str().unwrap().to_owned()
}

async fn daemon_peer(server: &TestServer, daemon: &str, dir: &str) -> Value {
    let resp = reqwest::Client::new()
        .post(server.url("/v1/peers"))
        .bearer_auth(daemon)
        .json(&json!({"group_id": "team", "hostname": "box", "working_directory": dir}))
        .send()
        .await
        .unwrap();
    resp.json().await.unwrap()
}

async fn report(server: &TestServer, daemon: &str, receipts: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(server.url("/v1/receipts"))
        .bearer_auth(daemon)
        .json(&json!({"receipts": receipts}))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

fn states(status: &Value) -> Vec<(String, String)> {
    status["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["peer"]["name"].as_str().unwrap().to_owned(), r["state"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn a_dm_moves_from_stored_through_daemon_receipts_to_read() {
    let server = TestServer::start().await;
    let daemon = new_daemon(&server).await;
    let pane = daemon_peer(&server, &daemon, "/pane").await;
    let (sender, me) = server.peer("team", "/sender").await;
    let mut sender_events = EventStream::open(
        &server.url(&format!("/notifications/team/{}", me["peer_id"].as_str().unwrap())),
        Some(me["token"].as_str().unwrap()),
        None,
    )
    .await;
    let mut daemon_events = EventStream::open(&server.url("/v1/groups/team/events"), Some(&daemon), None).await;

    let sent = sender.ok("send_dm", json!({"to": pane["peer_id"], "message": "please review #42"})).await;
    let id = sent["message_id"].as_str().unwrap();
    let status = sender.ok("message_status", json!({"message_id": id})).await;
    assert_eq!(states(&status), [("box:pane".into(), "stored".into())]);
    // the daemon's stream carries the whole text; the peer streams only previews
    let dm = daemon_events.next(LONG).await.unwrap();
    assert_eq!(dm.data["text"], "please review #42");

    let receipt = |state: &str| json!([{"peer_id": pane["peer_id"], "message_id": id, "state": state}]);
    assert_eq!(report(&server, &daemon, receipt("delivered")).await, (200, json!({"moved": 1, "unchanged": 0, "rejected": []})));
    let event = sender_events.next(LONG).await.unwrap();
    assert_eq!(event.event.as_deref(), Some("receipt"));
    assert_eq!(event.id, None, "receipts do not move Last-Event-ID");
    assert_eq!((event.data["id"].as_str(), event.data["state"].as_str()), (Some(id), Some("delivered")));
    assert_eq!(event.data["sender"]["peer_id"], pane["peer_id"]);

    // a repeat or a step back changes nothing and says nothing
    assert_eq!(report(&server, &daemon, receipt("delivered")).await.1["unchanged"], 1);
    let held = json!([{"peer_id": pane["peer_id"], "message_id": id, "state": "held", "detail": "bypass-permissions mode"}]);
    assert_eq!(report(&server, &daemon, held).await.1["moved"], 1);
    let status = sender.ok("message_status", json!({"message_id": id})).await;
    assert_eq!(status["recipients"][0]["state"], "held");
    assert_eq!(status["recipients"][0]["detail"], "bypass-permissions mode");
    assert_eq!(report(&server, &daemon, receipt("read")).await.1["moved"], 1);
    assert_eq!(report(&server, &daemon, receipt("notified")).await.1["unchanged"], 1);
    let got: Vec<String> = sender_events.drain(SHORT).await.iter().map(|e| e.data["state"].as_str().unwrap().to_owned()).collect();
    assert_eq!(got, ["held", "read"]);
    // the recipient's machine hears of what ends its own wait (held, read), not of the rest
    let own: Vec<String> = daemon_events.drain(SHORT).await.iter().map(|e| e.data["state"].as_str().unwrap().to_owned()).collect();
    assert_eq!(own, ["held", "read"]);

    // read through the inbox: read_new_messages does not hand it out again
    let pane_client = server.client(Some(pane["token"].as_str().unwrap())).await;
    let inbox = pane_client.ok("read_new_messages", json!({})).await;
    assert_eq!(inbox["messages"], json!([]));
    assert_eq!(states(&sender.ok("message_status", json!({"message_id": id})).await), [("box:pane".into(), "read".into())]);
}

#[tokio::test]
async fn read_new_messages_marks_read_and_history_shows_states_of_own_messages() {
    let server = TestServer::start().await;
    let (a, _) = server.peer("team", "/a").await;
    let (b, _) = server.peer("team", "/b").await;
    let (c, _) = server.peer("team", "/c").await;
    let sent = a.ok("send_message", json!({"message": "standup in 5"})).await;
    let id = sent["message_id"].as_str().unwrap();
    b.ok("read_new_messages", json!({})).await;
    let status = a.ok("message_status", json!({"message_id": id})).await;
    assert_eq!(states(&status), [("box:b".into(), "read".into()), ("box:c".into(), "stored".into())]);
    let text = relay_e2e::mcp::text(&a.call("message_status", json!({"message_id": id})).await);
    assert!(text.contains("✓✓ box:b: read") && text.contains("box:c: stored"), "{text}");

    let history = a.ok("get_history", json!({})).await;
    let delivery = &history["messages"][0]["delivery"];
    assert_eq!(delivery.as_array().unwrap().len(), 2, "{history}");
    // others' messages carry no delivery states
    c.ok("send_message", json!({"message": "from c"})).await;
    let history = a.ok("get_history", json!({})).await;
    assert!(history["messages"][1].get("delivery").is_none(), "{history}");

    // a recipient sees only its own copy; others may not ask; an unknown id says what to pass
    assert_eq!(states(&b.ok("message_status", json!({"message_id": id})).await), [("box:b".into(), "read".into())]);
    let dm = a.ok("send_dm", json!({"to": "box:b", "message": "just for b"})).await;
    let err = c.err("message_status", json!({"message_id": dm["message_id"]})).await;
    assert!(err.contains("no message") && err.contains("message_id"), "{err}");
    let err = a.err("message_status", json!({"message_id": "m_nope"})).await;
    assert!(err.contains("no message \"m_nope\""), "{err}");
}

#[tokio::test]
async fn daemons_report_only_for_their_own_peers_and_real_messages() {
    let server = TestServer::start().await;
    let (d1, d2) = (new_daemon(&server).await, new_daemon(&server).await);
    let mine = daemon_peer(&server, &d1, "/mine").await;
    let theirs = daemon_peer(&server, &d2, "/theirs").await;
    let (sender, _) = server.peer("team", "/sender").await;
    let sent = sender.ok("send_dm", json!({"to": theirs["peer_id"], "message": "for theirs"})).await;
    let id = sent["message_id"].as_str().unwrap();

    let receipts = json!([
        {"peer_id": theirs["peer_id"], "message_id": id, "state": "read"},
        {"peer_id": mine["peer_id"], "message_id": id, "state": "read"},
        {"peer_id": mine["peer_id"], "message_id": "m_nope", "state": "read"},
    ]);
    let (code, body) = report(&server, &d1, receipts).await;
    assert_eq!((code, body["moved"].as_u64()), (200, Some(0)));
    let errors: Vec<&str> = body["rejected"].as_array().unwrap().iter().map(|r| r["error"].as_str().unwrap()).collect();
    assert_eq!(
        errors,
        ["this daemon registered no such peer", "the message was not sent to this peer", "no such message in the peer's group"]
    );
    assert_eq!(states(&sender.ok("message_status", json!({"message_id": id})).await), [("box:theirs".into(), "stored".into())]);

    // a bad state or a bad token is refused outright
    let (code, _) = report(&server, &d1, json!([{"peer_id": mine["peer_id"], "message_id": id, "state": "teleported"}])).await;
    assert_eq!(code, 422);
    assert_eq!(report(&server, "rly_nope", json!([])).await.0, 401);
}
