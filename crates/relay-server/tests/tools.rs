//! The MCP tools, driven by rmcp's client against an in-process server.

mod support;

use serde_json::json;
use support::*;

#[tokio::test]
async fn lists_the_eight_tools_described_as_the_relays() {
    let server = TestServer::start().await;
    let client = server.client(None).await;
    let tools = client.service.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(
        names,
        ["get_history", "leave_group", "list_peers", "message_status", "read_new_messages", "register", "send_dm", "send_message"]
    );
    for tool in &tools {
        let description = tool.description.as_deref().unwrap_or_default();
        assert!(description.starts_with("Relay: "), "{}: {description}", tool.name);
    }
    let info = client.service.peer_info().unwrap();
    assert_eq!(info.server_info.as_ref().unwrap().name, "relay");
    assert!(info.instructions.as_deref().unwrap().contains("not any built-in messaging"));
}

/// `relay mcp` offers relay-proto's copy of the tools before it reaches a server: it must be
/// what the server lists. `RELAY_BLESS=1` rewrites the copy from the server.
#[tokio::test]
async fn relay_proto_holds_the_tools_the_server_lists() {
    let server = TestServer::start().await;
    let client = server.client(None).await;
    let listed = serde_json::to_value(client.service.list_all_tools().await.unwrap()).unwrap();
    if std::env::var_os("RELAY_BLESS").is_some() {
        std::fs::write(relay_proto::tools::DEFINITIONS_PATH, serde_json::to_string_pretty(&listed).unwrap() + "\n").unwrap();
    }
    let copy: serde_json::Value = serde_json::from_str(relay_proto::tools::DEFINITIONS).unwrap();
    assert!(
        copy == listed,
        "relay-proto's tools.json differs from the server's list; run: RELAY_BLESS=1 cargo test -p relay-server --test tools relay_proto"
    );
}

#[tokio::test]
async fn register_names_peers_and_never_duplicates_them() {
    let server = TestServer::start().await;
    let anon = server.client(None).await;
    let args = json!({"group_id": "team", "hostname": "box.local", "working_directory": "/src/api", "git_branch": "main"});
    let first = anon.ok("register", args.clone()).await;
    assert_eq!(first["display_name"], "box:api");
    assert_eq!(first["group_id"], "team");
    assert_eq!(first["new_peer"], true);
    assert_eq!(first["group_created"], true);
    assert!(first["token"].as_str().unwrap().starts_with("rly_"));
    assert!(first["how_to_call"].as_str().unwrap().contains("token="), "{first}");

    // the same host and directory again, with the peer's token: the same peer
    let mut with_token = args.clone();
    with_token["token"] = first["token"].clone();
    let again = anon.ok("register", with_token).await;
    assert_eq!(again["peer_id"], first["peer_id"]);
    assert_eq!(again["new_peer"], false);
    let c = server.client(Some(again["token"].as_str().unwrap())).await;
    assert_eq!(c.ok("list_peers", json!({})).await["peers"].as_array().unwrap().len(), 1);

    // another directory with the same last component: a new peer with a distinct name
    let other = anon.ok("register", json!({"group_id": "team", "hostname": "box", "working_directory": "/old/api"})).await;
    assert_ne!(other["peer_id"], first["peer_id"]);
    assert_eq!(other["display_name"], "box:api-2");

    // an explicit name
    let named = anon.ok("register", json!({"group_id": "team", "hostname": "h", "working_directory": "/x", "name": "alice"})).await;
    assert_eq!(named["display_name"], "alice");
}

/// Host, directory and name are on show in list_peers: registering with them takes no
/// peer over. Only the peer's token (or its daemon, tested with the daemon API) is proof.
#[tokio::test]
async fn nobody_takes_over_a_peer_by_registering_with_its_origin() {
    let server = TestServer::start().await;
    let (victim, reg) = server.peer("team", "/src/api").await;
    let (colleague, colleague_reg) = server.peer("team", "/src/web").await;
    colleague.ok("send_dm", json!({"to": reg["peer_id"], "message": "the deploy key is in vault"})).await;
    let anon = server.client(None).await;
    let same_origin = json!({"group_id": "team", "hostname": "box", "working_directory": "/src/api"});
    // an outsider, and a member with a token of its own
    for (who, token) in [("outsider", None), ("member", colleague_reg["token"].as_str())] {
        let mut args = same_origin.clone();
        if let Some(t) = token {
            args["token"] = json!(t);
        }
        let err = anon.err("register", args).await;
        assert!(err.contains("already a peer of group \"team\"") && err.contains("pass another `name`"), "{who}: {err}");
    }
    // the victim still is itself and still has its DM
    let inbox = victim.ok("read_new_messages", json!({})).await;
    assert_eq!(inbox["messages"][0]["text"], "the deploy key is in vault");
    assert_eq!(victim.ok("list_peers", json!({})).await["peers"].as_array().unwrap().len(), 2);
    // another name is another peer
    let mut named = same_origin.clone();
    named["name"] = json!("api-two");
    assert_ne!(anon.ok("register", named).await["peer_id"], reg["peer_id"]);
}

#[tokio::test]
async fn one_token_can_join_several_groups() {
    let server = TestServer::start().await;
    let (a, reg) = server.peer("one", "/src/a").await;
    let token = reg["token"].as_str().unwrap();
    let second = a.ok("register", json!({"group_id": "two", "hostname": "box", "working_directory": "/src/a"})).await;
    assert_eq!(second["token"], token);
    let err = a.err("send_message", json!({"message": "hi"})).await;
    assert!(err.contains("several groups (one, two)"), "{err}");
    a.ok("send_message", json!({"message": "hi", "group_id": "two"})).await;
    let peers = a.ok("list_peers", json!({})).await;
    assert_eq!(peers["peers"].as_array().unwrap().len(), 2);

    // a second peer in a group where this token already has one gets a token of its own
    let third = a.ok("register", json!({"group_id": "two", "hostname": "box", "working_directory": "/src/other"})).await;
    assert_ne!(third["token"], token);
    assert!(third["how_to_call"].as_str().unwrap().contains("its own token"), "{third}");
    let session = server.client_with(None, Mode::Session).await;
    let s1 = session.ok("register", json!({"group_id": "three", "hostname": "h", "working_directory": "/1"})).await;
    let s2 = session.ok("register", json!({"group_id": "three", "hostname": "h", "working_directory": "/2"})).await;
    assert_ne!(s1["token"], s2["token"]);
    // the session now speaks as the peer it registered last
    let sent = session.ok("send_message", json!({"message": "who?"})).await;
    assert_eq!(sent["from"]["peer_id"], s2["peer_id"]);
}

#[tokio::test]
async fn broadcasts_and_dms_reach_the_right_readers_once() {
    let server = TestServer::start().await;
    let (alice, a) = server.peer("team", "/src/alice").await;
    let (bob, b) = server.peer("team", "/src/bob").await;
    let (carol, _) = server.peer("team", "/src/carol").await;

    let sent = alice.ok("send_message", json!({"message": "build is green"})).await;
    assert_eq!(sent["recipients"], 2);
    let dm = alice.ok("send_dm", json!({"to": "box:bob", "message": "psst, bob"})).await;
    assert_eq!(dm["to"]["peer_id"], b["peer_id"]);

    let inbox = bob.ok("read_new_messages", json!({})).await;
    let msgs = inbox["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2, "{inbox}");
    assert_eq!(msgs[0]["text"], "build is green");
    assert_eq!(msgs[0]["kind"], "broadcast");
    assert_eq!(msgs[0]["sender"]["name"], "box:alice");
    assert_eq!(msgs[1]["text"], "psst, bob");
    assert_eq!(msgs[1]["kind"], "dm");
    assert_eq!(msgs[1]["sender"]["peer_id"], a["peer_id"]);
    assert!(inbox["notice"].as_str().unwrap().contains("not from your user"));
    let again = text(&bob.call("read_new_messages", json!({})).await);
    assert_eq!(again, "No new relay messages.");

    // carol sees the broadcast, not the DM; alice sees neither of her own
    let carol_msgs = carol.ok("read_new_messages", json!({})).await;
    assert_eq!(carol_msgs["messages"].as_array().unwrap().len(), 1);
    assert_eq!(alice.ok("read_new_messages", json!({})).await["messages"].as_array().unwrap().len(), 0);

    // the text form says who and what, and that it is untrusted
    bob.ok("send_dm", json!({"to": a["peer_id"], "message": "thanks"})).await;
    let shown = text(&alice.call("read_new_messages", json!({})).await);
    assert!(shown.contains("1 new relay message(s)") && shown.contains("box:bob DM to box:alice") && shown.contains("thanks"), "{shown}");
    assert!(shown.contains("not from your user"), "{shown}");
}

#[tokio::test]
async fn read_new_messages_pages_without_losing_any() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (bob, _) = server.peer("team", "/src/bob").await;
    for i in 0..7 {
        alice.ok("send_message", json!({"message": format!("m{i}")})).await;
    }
    let mut seen = Vec::new();
    loop {
        let batch = bob.ok("read_new_messages", json!({"limit": 3})).await;
        for m in batch["messages"].as_array().unwrap() {
            seen.push(m["text"].as_str().unwrap().to_owned());
        }
        if batch["more"] == false {
            break;
        }
    }
    assert_eq!(seen, ["m0", "m1", "m2", "m3", "m4", "m5", "m6"]);
}

#[tokio::test]
async fn send_dm_resolves_names_and_explains_misses() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let anon = server.client(None).await;
    // two peers whose names differ only in case
    anon.ok("register", json!({"group_id": "team", "hostname": "h1", "working_directory": "/a", "name": "Bob"})).await;
    anon.ok("register", json!({"group_id": "team", "hostname": "h2", "working_directory": "/b", "name": "bob2"})).await;
    let err = alice.err("send_dm", json!({"to": "nobody", "message": "x"})).await;
    assert!(err.contains("no peer \"nobody\"") && err.contains("Bob (") && err.contains("bob2 ("), "{err}");
    alice.ok("send_dm", json!({"to": "bob", "message": "case-insensitive match"})).await;
    alice.ok("send_dm", json!({"to": "@Bob", "message": "at-prefixed"})).await;
    let err = alice.err("send_dm", json!({"to": "box:alice", "message": "me"})).await;
    assert!(err.contains("no peer"), "{err}");

    // an ambiguous name: two groups each with a "dev"
    let (multi, reg) = server.peer("g1", "/src/multi").await;
    multi.ok("register", json!({"group_id": "g2", "hostname": "box", "working_directory": "/src/multi"})).await;
    anon.ok("register", json!({"group_id": "g1", "hostname": "x", "working_directory": "/1", "name": "dev"})).await;
    anon.ok("register", json!({"group_id": "g2", "hostname": "y", "working_directory": "/2", "name": "dev"})).await;
    let err = multi.err("send_dm", json!({"to": "dev", "message": "which?"})).await;
    assert!(err.contains("matches several peers") && err.contains("in g1") && err.contains("in g2"), "{err}");
    let err = multi.err("send_dm", json!({"to": reg["peer_id"], "message": "self"})).await;
    assert!(err.contains("yourself"), "{err}");
}

#[tokio::test]
async fn identity_by_session_by_token_argument_and_by_header() {
    let server = TestServer::start().await;
    let reg_args = json!({"group_id": "team", "hostname": "box", "working_directory": "/src/s"});

    // older protocol: the session that registered is the caller
    let session = server.client_with(None, Mode::Session).await;
    let reg = session.ok("register", reg_args.clone()).await;
    assert!(reg["how_to_call"].as_str().unwrap().contains("session is now registered"));
    session.ok("send_message", json!({"message": "via session"})).await;

    // the stateless protocol: no session, so the token argument
    let stateless = server.client(None).await;
    let err = stateless.err("send_message", json!({"message": "who am i"})).await;
    assert!(err.contains("Call the relay's `register` tool first") && err.contains("`token`"), "{err}");
    let token = reg["token"].as_str().unwrap();
    stateless.ok("send_message", json!({"message": "via argument", "token": token})).await;

    // a header wins over everything
    let header = server.client(Some(token)).await;
    let peers = header.ok("list_peers", json!({})).await;
    assert_eq!(peers["peers"][0]["peer_id"], reg["peer_id"]);

    let bad = server.client(Some("rly_not_a_real_token")).await;
    let err = bad.err("list_peers", json!({})).await;
    assert!(err.contains("token is not recognised"), "{err}");
    let err = stateless.err("list_peers", json!({"token": "nope"})).await;
    assert!(err.contains("token is not recognised"), "{err}");
}

#[tokio::test]
async fn history_by_group_thread_regex_and_time() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (bob, _) = server.peer("team", "/src/bob").await;
    for text in ["deploy started", "lunch?", "Deploy finished"] {
        alice.ok("send_message", json!({"message": text})).await;
    }
    alice.ok("send_dm", json!({"to": "box:bob", "message": "secret plan"})).await;
    bob.ok("send_dm", json!({"to": "box:alice", "message": "ack"})).await;

    let texts = |v: &serde_json::Value| {
        v["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    let all = bob.ok("get_history", json!({})).await;
    assert_eq!(texts(&all), ["deploy started", "lunch?", "Deploy finished"]);
    let deploys = bob.ok("get_history", json!({"filter": "(?i)^deploy"})).await;
    assert_eq!(texts(&deploys), ["deploy started", "Deploy finished"]);
    let last = bob.ok("get_history", json!({"limit": 1})).await;
    assert_eq!(texts(&last), ["Deploy finished"]);
    assert_eq!(last["truncated"], true);
    let thread = bob.ok("get_history", json!({"with_peer": "box:alice"})).await;
    assert_eq!(texts(&thread), ["secret plan", "ack"]);
    let future = bob.ok("get_history", json!({"start_time": "2999-01-01"})).await;
    assert!(texts(&future).is_empty());
    let past = bob.ok("get_history", json!({"end_time": "2000-01-01T00:00:00Z"})).await;
    assert!(texts(&past).is_empty());
    let err = bob.err("get_history", json!({"start_time": "yesterday"})).await;
    assert!(err.contains("not an ISO 8601 time"), "{err}");
    let err = bob.err("get_history", json!({"filter": "("})).await;
    assert!(err.contains("invalid filter"), "{err}");

    // a third party cannot read their thread, nor another group's history
    let (eve, _) = server.peer("other", "/src/eve").await;
    let err = eve.err("get_history", json!({"group_id": "team"})).await;
    assert!(err.contains("not a member of group \"team\""), "{err}");
    let (carol, _) = server.peer("team", "/src/carol").await;
    let carols = carol.ok("get_history", json!({"with_peer": "box:alice"})).await;
    assert!(texts(&carols).is_empty());
}

#[tokio::test]
async fn leave_group_ends_membership() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (bob, _) = server.peer("team", "/src/bob").await;
    let left = bob.ok("leave_group", json!({"group_id": "team"})).await;
    assert_eq!(left["display_name"], "box:bob");
    let peers = alice.ok("list_peers", json!({})).await;
    assert_eq!(peers["peers"].as_array().unwrap().len(), 1);
    let err = bob.err("send_message", json!({"message": "still here?"})).await;
    assert!(err.contains("not registered"), "{err}");
    let err = alice.err("send_dm", json!({"to": "box:bob", "message": "gone"})).await;
    assert!(err.contains("no peer"), "{err}");
    let err = alice.err("leave_group", json!({"group_id": "elsewhere"})).await;
    assert!(err.contains("not a member"), "{err}");
}

#[tokio::test]
async fn join_keys_protect_groups() {
    let server = TestServer::start().await;
    let anon = server.client(None).await;
    let reg = |dir: &str, key: Option<&str>| {
        let mut v = json!({"group_id": "secret", "hostname": "h", "working_directory": dir});
        if let Some(k) = key {
            v["join_key"] = json!(k);
        }
        v
    };
    anon.ok("register", reg("/a", Some("correct horse"))).await;
    let err = anon.err("register", reg("/b", None)).await;
    assert!(err.contains("protected by a join key"), "{err}");
    let err = anon.err("register", reg("/b", Some("wrong horse"))).await;
    assert!(err.contains("wrong join key"), "{err}");
    anon.ok("register", reg("/b", Some("correct horse"))).await;
    let err = anon.err("register", json!({"group_id": "g", "hostname": "h", "working_directory": "/", "join_key": "short"})).await;
    assert!(err.contains("join_key is too short"), "{err}");

    let strict = TestServer::start_with(|c| c.require_join_keys = true).await;
    let anon = strict.client(None).await;
    let err = anon.err("register", json!({"group_id": "open", "hostname": "h", "working_directory": "/"})).await;
    assert!(err.contains("requires a join key"), "{err}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_loses_nothing() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 1000).await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (bob, _) = server.peer("team", "/src/bob").await;
    alice.ok("send_message", json!({"message": "first"})).await;

    let err = alice.err("send_message", json!({"message": "x".repeat(1001)})).await;
    assert!(err.contains("message is too long: 1001 bytes, the limit is 1000"), "{err}");
    let err = alice.err("send_message", json!({"message": "   "})).await;
    assert!(err.contains("message must not be empty"), "{err}");
    let err = alice.err("send_message", json!({"message": "hi", "group_id": "bad group!"})).await;
    assert!(err.contains("not a member"), "{err}");
    let anon = server.client(None).await;
    let err = anon.err("register", json!({"group_id": "has space", "hostname": "h", "working_directory": "/"})).await;
    assert!(err.contains("group_id \"has space\""), "{err}");
    let err = anon.err("register", json!({"group_id": "g", "hostname": "h\u{1b}[2J", "working_directory": "/"})).await;
    assert!(err.contains("control characters"), "{err}");
    // arguments of the wrong shape are refused, saying which
    let params =
        rmcp::model::CallToolRequestParams::new("send_message").with_arguments(json!({"message": 42}).as_object().unwrap().clone());
    let refusal = format!("{:?}", alice.service.call_tool(params).await);
    assert!(refusal.contains("invalid type: integer `42`"), "{refusal}");

    alice.ok("send_message", json!({"message": "second"})).await;
    let inbox = bob.ok("read_new_messages", json!({})).await;
    let texts: Vec<&str> = inbox["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["first", "second"]);
}

#[tokio::test]
async fn a_request_body_over_the_limit_is_refused_with_413() {
    let server = TestServer::start_with(|c| {
        c.max_message_bytes = 1000;
        c.max_request_bytes = 4096;
    })
    .await;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "send_message", "arguments": {"message": "y".repeat(10_000)}}});
    let resp = reqwest::Client::new()
        .post(server.url("/mcp"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn sends_are_rate_limited_per_peer() {
    let server = TestServer::start_with(|c| {
        c.rate_burst = 3;
        c.rate_per_second = 0.5;
    })
    .await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (bob, _) = server.peer("team", "/src/bob").await;
    for i in 0..3 {
        alice.ok("send_message", json!({"message": format!("burst {i}")})).await;
    }
    let err = alice.err("send_message", json!({"message": "one too many"})).await;
    assert!(err.contains("rate limit") && err.contains("retry in"), "{err}");
    // another peer has its own bucket
    bob.ok("send_message", json!({"message": "bob is fine"})).await;
    // leaving and registering again is the same peer with the same bucket, not a full one
    let left = alice.ok("leave_group", json!({"group_id": "team"})).await;
    let again = alice.ok("register", json!({"group_id": "team", "hostname": "box", "working_directory": "/src/alice"})).await;
    assert_eq!(again["peer_id"], left["peer_id"]);
    let err = alice.err("send_message", json!({"message": "after leaving and coming back"})).await;
    assert!(err.contains("rate limit"), "{err}");
}

#[tokio::test]
async fn metrics_count_calls_and_messages() {
    let server = TestServer::start().await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    alice.ok("send_message", json!({"message": "m"})).await;
    alice.err("send_dm", json!({"to": "ghost", "message": "m"})).await;
    let text = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    for line in [
        "relay_tool_calls_total{tool=\"register\"} 1",
        "relay_tool_calls_total{tool=\"send_message\"} 1",
        "relay_tool_errors_total{tool=\"send_dm\"} 1",
        "relay_messages_total{kind=\"broadcast\"} 1",
        "relay_open_streams{kind=\"peer\"} 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert_eq!(reqwest::get(server.url("/healthz")).await.unwrap().text().await.unwrap(), "ok\n");
    server.stop().await;
}

#[tokio::test]
async fn a_name_that_looks_like_a_members_is_told_apart() {
    let server = TestServer::start().await;
    let anon = server.client(None).await;
    let register = |dir: &str, name: &str| json!({"group_id": "team", "hostname": "box", "working_directory": dir, "name": name});
    anon.ok("register", register("/a", "alice")).await;
    // Cyrillic letters that look Latin: the same name to a reader, so not the same name here
    let lookalike = anon.ok("register", register("/b", "\u{430}\u{4cf}\u{456}\u{441}\u{435}")).await;
    assert_eq!(lookalike["display_name"], "\u{430}\u{4cf}\u{456}\u{441}\u{435}-2");
    let err = anon.err("register", register("/c", "\u{430}lice")).await;
    assert!(err.contains("imitate"), "{err}");
    let err = anon.err("register", register("/d", "ali\u{202e}ce")).await;
    assert!(err.contains("name"), "{err}");
}

#[tokio::test]
async fn a_send_retried_with_its_idempotency_key_is_stored_once() {
    let server = TestServer::start_with(|c| {
        c.rate_burst = 2;
        c.rate_per_second = 0.001;
    })
    .await;
    let (alice, _) = server.peer("team", "/src/alice").await;
    let (bob, _) = server.peer("team", "/src/bob").await;
    let first = alice.ok("send_dm", json!({"to": "box:bob", "message": "deploy at 5", "idempotency_key": "k-1"})).await;
    assert!(first.get("repeated").is_none(), "{first}");
    // the answer was lost, say, and the client sends again: the same message, nothing new
    let again = alice.ok("send_dm", json!({"to": "box:bob", "message": "deploy at 5", "idempotency_key": "k-1"})).await;
    assert_eq!((again["message_id"].clone(), again["repeated"].clone()), (first["message_id"].clone(), json!(true)));
    let inbox = bob.ok("read_new_messages", json!({})).await;
    assert_eq!(inbox["messages"].as_array().unwrap().len(), 1, "{inbox}");
    // a key is for one message only
    let err = alice.err("send_dm", json!({"to": "box:bob", "message": "deploy at 6", "idempotency_key": "k-1"})).await;
    assert!(err.contains("idempotency_key") && err.contains("already used"), "{err}");
    // the repeat took no rate token: one is left for a new message
    alice.ok("send_message", json!({"message": "to all", "idempotency_key": "k-2"})).await;
    let again = alice.ok("send_message", json!({"message": "to all", "idempotency_key": "k-2"})).await;
    assert_eq!(again["repeated"], true);
    let err = alice.err("send_message", json!({"message": "one too many"})).await;
    assert!(err.contains("rate limit"), "{err}");
}
