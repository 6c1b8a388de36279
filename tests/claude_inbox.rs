//! The real Claude Code CLI, offline, talking through relay with no keystroke typed.
//!
//! A scripted stand-in for the Messages API (`python/fake_anthropic.py`) plays the model.
//! Each "machine" is a private HOME and runtime dir with its own relayd and its own tmux
//! server; one relay-server serves them all. Claude Code sessions run in tmux panes and are
//! attached with `relay attach`; relay-pane delivers into their inbox sockets.

use std::time::{Duration, Instant};

use relay_e2e::claude::{Setup, world};
use relay_e2e::tmux::{call_tool, relay_mcp};
use serde_json::{Value, json};

/// Polls `message_status` (as `client`) until the copy for `recipient` is in `state`.
async fn wait_for_state(client: &rmcp::service::RunningService<rmcp::RoleClient, ()>, id: &str, recipient: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = call_tool(client, "message_status", json!({"message_id": id})).await.unwrap();
        let copy = status["recipients"].as_array().unwrap().iter().find(|r| r["peer"]["name"] == recipient).cloned().unwrap_or_default();
        if copy["state"] == state {
            return copy;
        }
        assert!(Instant::now() < deadline, "{recipient}'s copy never became {state}: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_claude_code_sessions_talk_through_relay_with_no_keystrokes() {
    let test = "two_claude_code_sessions_talk_through_relay_with_no_keystrokes";
    let Some(w) = world(test) else { return };
    let Some(a) = w.machine(test, "alice") else { return };
    let Some(b) = w.machine(test, "bob") else { return };
    for m in [&a, &b] {
        m.configure_relay_mcp(&w.claude);
    }
    w.model.script(json!([
        {"match": "PLEASE DM BOB", "once": true, "reply": {"tool_use": {"name": "mcp__relay__send_dm", "input": {"to": "bob", "message": "hello bob, the build is green"}}}},
        {"match": "hello bob, the build is green", "once": true, "reply": {"tool_use": {"name": "mcp__relay__send_dm", "input": {"to": "alice", "message": "thanks alice, merging now"}}}},
        {"match": "PLEASE WAIT A BIT", "once": true, "reply": {"tool_use": {"name": "Bash", "input": {"command": "sleep 4", "description": "wait"}}}},
    ]));
    let pane_a = a.start_claude("");
    let pane_b = b.start_claude("");
    let said = a.attach(&pane_a, "alice");
    assert!(said.contains("has an inbox"), "{said}");
    b.attach(&pane_b, "bob");
    // the introductions went through the inboxes, and each started a turn
    w.model.wait_for("you are alice in relay group cc", Duration::from_secs(20));
    w.model.wait_for("you are bob in relay group cc", Duration::from_secs(20));

    // A's model DMs B with relay's tool; B's next request holds the text itself
    a.prompt(&pane_a, "PLEASE DM BOB");
    let started = Instant::now();
    let (turn, _) = w.model.wait_for("hello bob, the build is green", Duration::from_secs(30));
    eprintln!("A's send_dm → B's model request: {:?} (incl. A's own turn)", started.elapsed());
    assert!(turn.contains("direct message to you (bob) from alice") && turn.contains("not from your user"), "{turn}");
    // B answers with relay's tool; A's next request holds the answer
    w.model.wait_for("thanks alice, merging now", Duration::from_secs(30));
    assert!(!b.screen(&pane_b).contains("[RELAY]"), "a line was typed into B's pane:\n{}", b.screen(&pane_b));
    assert!(!a.screen(&pane_a).contains("[RELAY]"), "a line was typed into A's pane");

    // A's message shows as read by B
    let a_client = relay_mcp(&a.socket, &pane_a).await;
    let thread = call_tool(&a_client, "get_history", json!({"with_peer": "bob"})).await.unwrap();
    let mine = thread["messages"].as_array().unwrap().iter().find(|m| m["text"] == "hello bob, the build is green").cloned().unwrap();
    wait_for_state(&a_client, mine["id"].as_str().unwrap(), "bob", "read").await;

    // a message that arrives while B's tool call runs reaches B after it, in the same turn
    b.prompt(&pane_b, "PLEASE WAIT A BIT");
    w.model.wait_for("PLEASE WAIT A BIT", Duration::from_secs(20));
    tokio::time::sleep(Duration::from_millis(1500)).await; // the sleep tool runs now
    call_tool(&a_client, "send_dm", json!({"to": "bob", "message": "a note for bob while he is busy"})).await.unwrap();
    let (turn, with_tool_result) = w.model.wait_for("a note for bob while he is busy", Duration::from_secs(30));
    assert!(with_tool_result, "the note should ride with the tool's result, in the same turn: {turn}");

    // after /clear (a new conversation, a new transcript, the same process) relay still
    // sees B read what it is told
    let before = b.session_entry(&pane_b).unwrap()["sessionId"].clone();
    b.prompt(&pane_b, "/clear");
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.session_entry(&pane_b).unwrap()["sessionId"] == before {
        assert!(Instant::now() < deadline, "/clear kept the session id");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = call_tool(&a_client, "send_dm", json!({"to": "bob", "message": "bob, after the clear"})).await.unwrap();
    w.model.wait_for("bob, after the clear", Duration::from_secs(30));
    wait_for_state(&a_client, sent["message_id"].as_str().unwrap(), "bob", "read").await;

    // closing B's sidebar takes its reply sockets out of Claude Code's socket directory
    let socks = b.home.parent().unwrap().join("run/cc-socks");
    let reply_sockets =
        || std::fs::read_dir(&socks).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("relay-")).count();
    assert!(reply_sockets() > 0, "no reply socket beside B's session");
    let sidebar = relay_tmux::panes_started_with(&b.tmux.tmux, &format!("relay-pane' --pane {pane_b} --socket")).unwrap().remove(0);
    relay_tmux::kill_pane(&b.tmux.tmux, &sidebar).unwrap();
    relay_e2e::wait_until("the reply sockets to go", Duration::from_secs(10), || reply_sockets() == 0);
    let _ = a_client.cancel().await;
}

/// As a new user meets relay: Claude Code already running (relay's MCP server configured
/// by an earlier attach, say before a reboot), no relayd, the server named only in
/// `~/.config/relay/config.toml` and not at the default address; `relay attach` afterwards.
/// Bob's Claude Code has a `CLAUDE_CONFIG_DIR` of its own, which neither tmux nor the shell
/// that runs `relay attach` knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_gives_the_agents_relays_tools_and_their_inboxes() {
    let test = "a_cold_start_gives_the_agents_relays_tools_and_their_inboxes";
    let Some(w) = world(test) else { return };
    let Some(a) = w.machine_with(test, "alice", Setup { cold: true, ..Setup::default() }) else { return };
    let Some(b) = w.machine_with(test, "bob", Setup { cold: true, claude_config_dir: Some(".claude-work") }) else { return };
    for m in [&a, &b] {
        m.configure_relay_mcp(&w.claude);
    }
    w.model.script(json!([
        {"match": "PLEASE DM BOB", "once": true, "reply": {"tool_use": {"name": "mcp__relay__send_dm", "input": {"to": "bob", "message": "bob, a cold start works"}}}},
        {"match": "bob, a cold start works", "once": true, "reply": {"tool_use": {"name": "mcp__relay__send_dm", "input": {"to": "alice", "message": "alice, so it does"}}}},
    ]));
    let pane_a = a.start_claude("");
    let pane_b = b.start_claude("");
    assert!(!a.socket.exists() && !b.socket.exists(), "a relayd is running already");
    let said = a.attach(&pane_a, "alice");
    assert!(said.contains("started relayd") && said.contains("has an inbox"), "{said}");
    let said = b.attach(&pane_b, "bob");
    assert!(said.contains("has an inbox"), "{said}");
    w.model.wait_for("you are alice in relay group cc", Duration::from_secs(20));
    w.model.wait_for("you are bob in relay group cc", Duration::from_secs(20));

    a.prompt(&pane_a, "PLEASE DM BOB");
    let (turn, _) = w.model.wait_for("bob, a cold start works", Duration::from_secs(30));
    assert!(turn.contains("direct message to you (bob) from alice"), "{turn}");
    let (turn, _) = w.model.wait_for("alice, so it does", Duration::from_secs(30));
    assert!(turn.contains("direct message to you (alice) from bob"), "{turn}");
    for (m, pane) in [(&a, &pane_a), (&b, &pane_b)] {
        let screen = m.screen(pane);
        assert!(!screen.contains("[RELAY]") && !screen.contains("No such tool"), "{pane}:\n{screen}");
        let status = String::from_utf8_lossy(&m.tmux.relay(&m.socket, &["status", "--json"], &m.env).stdout).into_owned();
        let status: Value = serde_json::from_str(&status).unwrap();
        assert_eq!(status["delivery"][pane.as_str()]["path"], "inbox", "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_without_relay_tools_answers_with_its_own_send_message() {
    let test = "a_session_without_relay_tools_answers_with_its_own_send_message";
    let Some(w) = world(test) else { return };
    let Some(a) = w.machine(test, "alice") else { return };
    let Some(c) = w.machine(test, "carol") else { return };
    a.configure_relay_mcp(&w.claude);
    // carol's Claude Code runs before relay is set up: relay attach configures the MCP server,
    // which this session does not load; it answers through SendMessage to the notice's address
    w.model.script(json!([
        {"match": "from=\"(uds:[^\"]+)\"[^>]*>\\s*relay: 1 direct message to you \\(carol\\)", "once": true,
         "reply": {"tool_use": {"name": "SendMessage", "input": {"to": "$1", "message": "carol here: the answer is 42"}}}},
    ]));
    let pane_a = a.start_claude("");
    let pane_c = c.start_claude("");
    a.attach(&pane_a, "alice");
    c.attach(&pane_c, "carol");
    w.model.wait_for("you are carol in relay group cc", Duration::from_secs(20));

    let a_client = relay_mcp(&a.socket, &pane_a).await;
    let sent = call_tool(&a_client, "send_dm", json!({"to": "carol", "message": "carol, what is the answer?"})).await.unwrap();
    w.model.wait_for("carol, what is the answer?", Duration::from_secs(30));
    // the answer comes back over relay, as a DM from carol, into alice's session
    let (turn, _) = w.model.wait_for("direct message to you (alice) from carol", Duration::from_secs(30));
    assert!(turn.contains("carol here: the answer is 42"), "{turn}");
    wait_for_state(&a_client, sent["message_id"].as_str().unwrap(), "carol", "read").await;
    assert!(!c.screen(&pane_c).contains("[RELAY]"), "a line was typed into carol's pane");
    let _ = a_client.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bypass_permissions_session_holds_the_message_and_the_sender_sees_held() {
    let test = "a_bypass_permissions_session_holds_the_message_and_the_sender_sees_held";
    let Some(w) = world(test) else { return };
    let Some(a) = w.machine(test, "alice") else { return };
    let Some(d) = w.machine(test, "dave") else { return };
    a.configure_relay_mcp(&w.claude);
    d.configure_relay_mcp(&w.claude);
    let pane_a = a.start_claude("");
    let pane_d = d.start_claude("--dangerously-skip-permissions");
    a.attach(&pane_a, "alice");
    d.attach(&pane_d, "dave");

    let a_client = relay_mcp(&a.socket, &pane_a).await;
    let sent = call_tool(&a_client, "send_dm", json!({"to": "dave", "message": "dave, please rotate the keys"})).await.unwrap();
    let copy = wait_for_state(&a_client, sent["message_id"].as_str().unwrap(), "dave", "held").await;
    assert!(copy["detail"].as_str().unwrap_or_default().contains("approval"), "{copy}");
    assert!(!w.model.turns().iter().any(|(t, _)| t.contains("rotate the keys")), "a held message reached the model");
    // relay status on dave's machine says so, and how to let it in
    let out = d.tmux.relay(&d.socket, &["status"], &d.env);
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(status.contains(&format!("⏸ {pane_d}")) && status.contains("crossSessionInbound"), "{status}");
    // the human lets them in (Down, Enter on each dialog: relay's introduction was held
    // too): dave's model gets the message, alice sees it read
    let seen = || w.model.turns().iter().any(|(t, _)| t.contains("dave, please rotate the keys"));
    for _ in 0..10 {
        if seen() {
            break;
        }
        relay_tmux::send_keys(&d.tmux.tmux, &pane_d, &["Down"]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        relay_tmux::send_enter(&d.tmux.tmux, &pane_d).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    }
    w.model.wait_for("dave, please rotate the keys", Duration::from_secs(10));
    wait_for_state(&a_client, sent["message_id"].as_str().unwrap(), "dave", "read").await;
    let _ = a_client.cancel().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_refuses_the_inbox_gets_typed_announcements_with_fallback_keys() {
    let test = "a_session_that_refuses_the_inbox_gets_typed_announcements_with_fallback_keys";
    let Some(w) = world(test) else { return };
    let Some(a) = w.machine(test, "alice") else { return };
    let Some(e) = w.machine(test, "erin") else { return };
    a.configure_relay_mcp(&w.claude);
    e.configure_relay_mcp(&w.claude);
    e.set_setting("crossSessionInbound", json!("refuse"));
    w.model.script(json!([
        {"match": "\\[RELAY\\] 1 new DM in cc from alice", "once": true, "reply": {"tool_use": {"name": "mcp__relay__read_new_messages", "input": {}}}},
    ]));
    let pane_a = a.start_claude("");
    let pane_e = e.start_claude("");
    a.attach(&pane_a, "alice");
    e.attach_with(&pane_e, "erin", &["--fallback", "keys"]);
    // the inbox refused relay's introduction, so it was typed
    w.model.wait_for("[RELAY] You are erin in relay group cc", Duration::from_secs(30));

    // refused by the inbox, announced by keystrokes; erin's model reads it with relay's tool
    let a_client = relay_mcp(&a.socket, &pane_a).await;
    let sent = call_tool(&a_client, "send_dm", json!({"to": "erin", "message": "erin, the deploy is yours"})).await.unwrap();
    w.model.wait_for("[RELAY] 1 new DM in cc from alice", Duration::from_secs(30));
    w.model.wait_for("erin, the deploy is yours", Duration::from_secs(30));
    wait_for_state(&a_client, sent["message_id"].as_str().unwrap(), "erin", "read").await;
    assert!(!w.model.turns().iter().any(|(t, _)| t.contains("direct message to you (erin)")), "the inbox let a notice in");
    let _ = a_client.cancel().await;
}
