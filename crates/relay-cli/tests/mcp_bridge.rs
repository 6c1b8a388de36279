//! `relay mcp` driven by an MCP client over stdio, with a real relayd and relay-server.

use std::process::Stdio;
use std::time::Duration;

use relay_e2e::mcp::{Client as Mcp, Mode};
use relay_e2e::tmux::relay_mcp;
use relay_e2e::{ServerProcess, binary, spawn_relayd};
use relay_proto::local::{AttachRequest, Reply, Request};
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt, service::RunningService};
use serde_json::{Value, json};

/// A control connection to the relayd just started, once it listens.
async fn connect(socket: &std::path::Path) -> relay_local::client::Client {
    for _ in 0..500 {
        if let Ok(c) = relay_local::client::Client::connect(socket, "test").await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("relayd did not start listening at {}", socket.display());
}

/// The next agent a subscribed sidebar hears of (within 10 s), and its pane.
async fn heard_agent(sidebar: &mut relay_local::client::Client, what: &str) -> (String, relay_proto::local::AgentInfo) {
    let heard = async {
        loop {
            if let Reply::Agent { pane, agent } = sidebar.next().await.unwrap() {
                return (pane, agent);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), heard).await.unwrap_or_else(|_| panic!("{what}"))
}

async fn call(client: &RunningService<RoleClient, ()>, tool: &str, args: Value) -> (bool, String, Option<Value>) {
    let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args.as_object().cloned().unwrap());
    let r = client.call_tool(params).await.unwrap();
    let text = r.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect::<Vec<_>>().join("\n");
    (r.is_error == Some(true), text, r.structured_content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_speaks_for_the_pane_without_tokens_in_sight() {
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let base = server.url("");
    let dir = tempfile::tempdir().unwrap();
    let (mut relayd, socket) = spawn_relayd(dir.path(), &base, &["--no-notifications"], &[], Stdio::null());
    let mut client = connect(&socket).await;

    // not attached yet: the tools are listed (Claude Code asks only once, at its start), and
    // each says what to do
    let unattached = relay_mcp(&socket, "%7").await;
    let tools = unattached.list_all_tools().await.unwrap();
    assert!(tools.iter().any(|t| t.name == "send_message"), "{tools:?}");
    let (failed, text, _) = call(&unattached, "send_message", json!({"message": "hi"})).await;
    assert!(failed && text.contains("relay attach %7 --group GROUP"), "{text}");

    // attached: calls go out as the pane's peer
    let req = AttachRequest { pane: "%7".into(), group: "team".into(), working_directory: "/src/seven".into(), ..Default::default() };
    let Reply::Attached { attachment, .. } = client.request(&Request::Attach(req)).await.unwrap() else { panic!() };
    let (far, far_reg) = {
        let anon = Mcp::connect(&server.url("/mcp"), None, Mode::Stateless).await;
        let reg = anon.ok("register", json!({"group_id": "team", "hostname": "far", "working_directory": "/far"})).await;
        (Mcp::connect(&server.url("/mcp"), Some(reg["token"].as_str().unwrap()), Mode::Stateless).await, reg)
    };
    let agent = relay_mcp(&socket, "%7").await;
    for tool in agent.list_all_tools().await.unwrap() {
        let props = tool.input_schema.get("properties").and_then(|p| p.as_object()).cloned().unwrap_or_default();
        assert!(!props.contains_key("token"), "{} still asks for a token", tool.name);
    }
    let (failed, text, sent) = call(&agent, "send_message", json!({"message": "hello from the bridge"})).await;
    assert!(!failed, "{text}");
    assert_eq!(sent.unwrap()["from"]["peer_id"], attachment.peer_id.as_str());
    far.ok("send_dm", json!({"to": attachment.peer_id, "message": "hi seven"})).await;
    let (_, text, inbox) = call(&agent, "read_new_messages", json!({})).await;
    let inbox = inbox.unwrap();
    assert_eq!(inbox["messages"][0]["text"], "hi seven", "{text}");
    assert_eq!(inbox["messages"][0]["sender"]["peer_id"], far_reg["peer_id"]);
    let got = far.ok("read_new_messages", json!({})).await;
    assert_eq!(got["messages"][0]["text"], "hello from the bridge");

    let _ = agent.cancel().await;
    let _ = unattached.cancel().await;
    relayd.kill_hard();
}

/// `relay mcp` tells relayd which process runs it and, under Claude Code, that session's
/// inbox socket; the pane's sidebar (a subscriber) hears of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reports_its_agent_to_the_panes_subscribers() {
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let dir = tempfile::tempdir().unwrap();
    let (mut relayd, socket) = spawn_relayd(dir.path(), &server.url(""), &["--no-notifications"], &[], Stdio::null());
    let mut client = connect(&socket).await;
    let req = AttachRequest { pane: "%9".into(), group: "team".into(), working_directory: "/nine".into(), ..Default::default() };
    client.request(&Request::Attach(req)).await.unwrap();
    let mut sidebar = relay_local::client::Client::connect(&socket, "test").await.unwrap();
    sidebar.request(&Request::Subscribe { pane: "%9".into(), since: Default::default() }).await.unwrap();

    let mut cmd = tokio::process::Command::new(binary("relay"));
    cmd.args(["mcp", "--pane", "%9"])
        .env("RELAYD_SOCKET", &socket)
        .env("CLAUDE_CODE_MESSAGING_SOCKET", "/tmp/cc-socks/12345.sock")
        .env("CLAUDE_CODE_SESSION_ID", "session-9")
        .stderr(Stdio::null());
    let agent = ().serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();
    let heard = heard_agent(&mut sidebar, "the sidebar hears of the agent").await;
    assert_eq!(heard.0, "%9");
    assert_eq!(heard.1.pid, std::process::id(), "the agent is relay mcp's parent: this test");
    assert_eq!(heard.1.messaging_socket.as_deref(), Some("/tmp/cc-socks/12345.sock"));
    assert_eq!(heard.1.session_id.as_deref(), Some("session-9"));

    // a sidebar that subscribes later is told at once
    let mut late = relay_local::client::Client::connect(&socket, "test").await.unwrap();
    late.request(&Request::Subscribe { pane: "%9".into(), since: Default::default() }).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), late.next()).await.unwrap().unwrap();
    assert!(matches!(&next, Reply::Agent { agent, .. } if agent.pid == std::process::id()), "{next:?}");
    let _ = agent.cancel().await;
    relayd.kill_hard();
}

/// The order a new user takes: Claude Code (and so `relay mcp`) starts before relayd runs,
/// with the server named only in `config.toml`. The agent has relay's tools from its first
/// question; relayd hears of the agent once it comes up; a call works once the pane is
/// attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_started_before_relayd_has_the_tools_and_reports_once_relayd_is_up() {
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".config/relay")).unwrap();
    std::fs::write(home.join(".config/relay/config.toml"), format!("server = \"{}\"\n", server.url(""))).unwrap();
    let socket = dir.path().join("run/relayd.sock");

    let mut cmd = tokio::process::Command::new(binary("relay"));
    cmd.args(["mcp", "--pane", "%5"])
        .env("HOME", &home)
        .env("RELAYD_SOCKET", &socket)
        .env("CLAUDE_CONFIG_DIR", home.join("claude-work"))
        .env("CLAUDE_CODE_MESSAGING_SOCKET", "/tmp/cc-socks/55.sock")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("RELAY_SERVER")
        .env_remove("RELAY_CONFIG")
        .env_remove("CLAUDE_CODE_SESSION_ID")
        .stderr(Stdio::null());
    let agent = ().serve(TokioChildProcess::new(cmd).unwrap()).await.unwrap();
    let mut names: Vec<String> = agent.list_all_tools().await.unwrap().into_iter().map(|t| t.name.into_owned()).collect();
    names.sort();
    assert_eq!(
        names,
        ["get_history", "leave_group", "list_peers", "message_status", "read_new_messages", "register", "send_dm", "send_message"],
        "relay mcp offers relay's tools with no relayd running"
    );

    let (mut relayd, socket) = spawn_relayd(dir.path(), &server.url(""), &["--no-notifications"], &[], Stdio::null());
    let mut client = connect(&socket).await;
    let mut sidebar = relay_local::client::Client::connect(&socket, "test").await.unwrap();
    sidebar.request(&Request::Subscribe { pane: "%5".into(), since: Default::default() }).await.unwrap();
    let reported = heard_agent(&mut sidebar, "relay mcp reports its agent once relayd is up").await.1;
    assert_eq!(reported.pid, std::process::id());
    assert_eq!(reported.messaging_socket.as_deref(), Some("/tmp/cc-socks/55.sock"));
    assert_eq!(reported.claude_config_dir.as_deref(), Some(home.join("claude-work").to_str().unwrap()));
    assert_eq!(reported.home.as_deref(), Some(home.to_str().unwrap()));

    let req = AttachRequest { pane: "%5".into(), group: "late".into(), working_directory: "/five".into(), ..Default::default() };
    let Reply::Attached { attachment, .. } = client.request(&Request::Attach(req)).await.unwrap() else { panic!() };
    let (failed, text, sent) = call(&agent, "send_message", json!({"message": "here at last"})).await;
    assert!(!failed, "{text}");
    assert_eq!(sent.unwrap()["from"]["peer_id"], attachment.peer_id.as_str());

    // relayd restarts (and forgets the agent): relay mcp tells the new one
    relayd.kill_hard();
    let (mut relayd, socket) = spawn_relayd(dir.path(), &server.url(""), &["--no-notifications"], &[], Stdio::null());
    let _client = connect(&socket).await;
    let mut sidebar = relay_local::client::Client::connect(&socket, "test").await.unwrap();
    sidebar.request(&Request::Subscribe { pane: "%5".into(), since: Default::default() }).await.unwrap();
    let again = heard_agent(&mut sidebar, "relay mcp reports its agent to a restarted relayd").await.1;
    assert_eq!(again.pid, std::process::id());
    let _ = agent.cancel().await;
    relayd.kill_hard();
}

/// A TCP proxy to `to` that, once armed, lets the next request naming `needle` through
/// to the server and drops its answer: the connection closes instead, as when a server dies
/// between committing and answering.
async fn answer_dropping_proxy(to: std::net::SocketAddr, needle: &'static [u8]) -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let armed = std::sync::Arc::new(AtomicBool::new(false));
    let arm = armed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(to).await else { continue };
            let (mut client_in, mut client_out) = client.into_split();
            let (mut server_in, mut server_out) = server.into_split();
            let doomed = std::sync::Arc::new(AtomicBool::new(false));
            let (armed, doomed_up) = (armed.clone(), doomed.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = client_in.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if buf[..n].windows(needle.len()).any(|w| w == needle) && armed.swap(false, Ordering::SeqCst) {
                        doomed_up.store(true, Ordering::SeqCst);
                    }
                    if server_out.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = server_in.read(&mut buf).await {
                    // the answer to the doomed request is dropped, and the connection with it
                    if n == 0 || doomed.load(Ordering::SeqCst) || client_out.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, arm)
}

/// The server stores a send and its answer is lost on the way: relay mcp makes the call
/// again on a new connection with the same idempotency key, and the message is sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_answer_was_lost_is_made_again_and_sent_once() {
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let (proxy, drop_next_answer) = answer_dropping_proxy(server.addr, b"send_message").await;
    let dir = tempfile::tempdir().unwrap();
    let (mut relayd, socket) = spawn_relayd(dir.path(), &proxy, &["--no-notifications"], &[], Stdio::null());
    let mut client = connect(&socket).await;
    let req = AttachRequest { pane: "%5".into(), group: "team".into(), working_directory: "/five".into(), ..Default::default() };
    client.request(&Request::Attach(req)).await.unwrap();
    let anon = Mcp::connect(&server.url("/mcp"), None, Mode::Stateless).await;
    let reg = anon.ok("register", json!({"group_id": "team", "hostname": "far", "working_directory": "/far"})).await;
    let far = Mcp::connect(&server.url("/mcp"), Some(reg["token"].as_str().unwrap()), Mode::Stateless).await;

    let agent = relay_mcp(&socket, "%5").await;
    drop_next_answer.store(true, std::sync::atomic::Ordering::SeqCst);
    let (failed, text, sent) = call(&agent, "send_message", json!({"message": "exactly once"})).await;
    assert!(!failed, "{text}");
    assert!(!drop_next_answer.load(std::sync::atomic::Ordering::SeqCst), "no answer was dropped");
    assert_eq!(sent.unwrap()["repeated"], true, "the second call found the first one's message");
    let got = far.ok("read_new_messages", json!({})).await;
    let texts: Vec<&str> = got["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["exactly once"]);
    let _ = agent.cancel().await;
    relayd.kill_hard();
}

/// After a server restart the next send goes through, once, with no error for the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_after_a_server_restart_goes_through_once() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    let mut server = ServerProcess::start(0, &["--data-dir", &data_dir]);
    let port = server.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let (mut relayd, socket) = spawn_relayd(dir.path(), &server.url(""), &["--no-notifications"], &[], Stdio::null());
    let mut client = connect(&socket).await;
    let req = AttachRequest { pane: "%5".into(), group: "team".into(), working_directory: "/five".into(), ..Default::default() };
    client.request(&Request::Attach(req)).await.unwrap();
    let anon = Mcp::connect(&server.url("/mcp"), None, Mode::Stateless).await;
    let reg = anon.ok("register", json!({"group_id": "team", "hostname": "far", "working_directory": "/far"})).await;
    let token = reg["token"].as_str().unwrap().to_owned();

    let agent = relay_mcp(&socket, "%5").await;
    let (failed, text, _) = call(&agent, "send_message", json!({"message": "before the restart"})).await;
    assert!(!failed, "{text}");
    server.stop();
    let server = ServerProcess::start(port, &["--data-dir", &data_dir]);
    let (failed, text, _) = call(&agent, "send_message", json!({"message": "after the restart"})).await;
    assert!(!failed, "{text}");

    let far = Mcp::connect(&server.url("/mcp"), Some(&token), Mode::Stateless).await;
    let got = far.ok("read_new_messages", json!({})).await;
    let texts: Vec<&str> = got["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["before the restart", "after the restart"]);
    let _ = agent.cancel().await;
    relayd.kill_hard();
}
