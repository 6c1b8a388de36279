//! The first five minutes, for real: a tmux server of its own (`tmux -L`), relay-server and
//! relayd as processes, two panes running a stand-in agent that logs every line it gets,
//! `relay attach` for both, a message sent through `relay mcp`, an announcement typed into
//! the other pane, its sidebar showing the message, a DM raising a desktop notification, the
//! sidebar outliving a relayd restart, `relay detach` cleaning up, a closed agent pane taking
//! its sidebar with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relay_e2e::desktop::Desktop;
use relay_e2e::tmux::{TmuxServer, call_tool, relay_mcp as mcp, stand_in_agent};
use relay_e2e::{ServerProcess, spawn_relayd, wait_until};
use rmcp::{RoleClient, service::RunningService};
use serde_json::json;

/// Environment variables for a pane.
type Env = Vec<(String, String)>;

/// With Claude Code's CLI installed: a PATH where `claude` is it, and a private HOME.
fn claude_env(dir: &Path, test: &str) -> Option<(Env, PathBuf, PathBuf)> {
    let bin = relay_e2e::claude_code(test)?;
    let bin_dir = dir.join("bin");
    let home = dir.join("home");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(&bin, bin_dir.join("claude")).unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut env = vec![("PATH".to_owned(), path), ("HOME".to_owned(), home.display().to_string())];
    for quiet in relay_e2e::CLAUDE_QUIET_ENV {
        env.push((quiet.to_owned(), "1".to_owned()));
    }
    Some((env, bin, home))
}

async fn call(client: &RunningService<RoleClient, ()>, tool: &str, args: serde_json::Value) -> serde_json::Value {
    call_tool(client, tool, args).await.unwrap()
}

// (long: one user's session, step by step, as a person would go through it)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_two_agents_message_announce_read_and_detach() {
    let test = "attach_two_agents_message_announce_read_and_detach";
    let dir = tempfile::tempdir().unwrap();
    // attach configures Claude Code's MCP servers (once), when its CLI is here, in the
    // configuration the agent runs with: the stand-in agents get the private HOME too
    let claude = claude_env(dir.path(), test);
    let Some(t) = TmuxServer::start_with_env(test, "e2e", claude.as_ref().map_or(&[][..], |(env, _, _)| &env[..])) else { return };
    let Some(desktop) = Desktop::start(test) else { return };
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let start_relayd = || spawn_relayd(dir.path(), &server.url(""), &[], &[("DBUS_SESSION_BUS_ADDRESS", &desktop.bus)], Stdio::null());
    let (mut relayd, socket) = start_relayd();
    let agent = stand_in_agent(dir.path());
    let log_a = dir.path().join("a.log");
    let log_b = dir.path().join("b.log");
    let pane_a = t.new_pane("/tmp", &format!("python3 {} {}", agent.display(), log_a.display()));
    let pane_b = t.new_pane("/", &format!("python3 {} {}", agent.display(), log_b.display()));
    wait_until("relayd", Duration::from_secs(10), || socket.exists());
    wait_until("the stand-in agents", Duration::from_secs(10), || log_a.exists() && log_b.exists());

    let (env, mcp_flag) = match &claude {
        Some((env, _, _)) => (env.clone(), None),
        None => (Vec::new(), Some("--no-mcp-config")),
    };
    for (pane, name) in [(&pane_a, "alice"), (&pane_b, "bob")] {
        let started = Instant::now();
        let mut args = vec!["attach", pane.as_str(), "--group", "e2e", "--name", name];
        args.extend(mcp_flag);
        let out = t.relay(&socket, &args, &env);
        eprintln!("relay attach {pane} took {:?}", started.elapsed());
        assert!(out.status.success(), "attach {pane}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(&format!("Attached {pane} (claude) to group e2e")) && said.contains("sidebar %"), "{said}");
    }
    if let Some((_, bin, home)) = &claude {
        let listed = relay_e2e::claude_command(bin, home).args(["mcp", "list"]).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        let relay_lines: Vec<&str> = listed.lines().filter(|l| l.starts_with("relay:")).collect();
        assert_eq!(relay_lines.len(), 1, "{listed}");
        assert!(relay_lines[0].contains(" mcp") && relay_lines[0].contains("✔ Connected"), "{listed}");
    }
    // the intro line reached each agent
    wait_until("the intro line", Duration::from_secs(10), || {
        std::fs::read_to_string(&log_b).unwrap_or_default().contains("[RELAY] You are bob in relay group e2e.")
    });
    // attaching again is a no-op: no second sidebar
    let again = t.relay(&socket, &["attach", &pane_b, "--group", "e2e", "--name", "bob", "--no-mcp-config"], &[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("already attached"));
    let sidebars = |pane: &str| relay_tmux::panes_started_with(&t.tmux, &format!("relay-pane' --pane {pane} --socket")).unwrap();
    assert_eq!(sidebars(&pane_b).len(), 1);

    // A sends through relay mcp; B is told, in one line, without the content
    let a = mcp(&socket, &pane_a).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // sidebars subscribed
    call(&a, "send_message", json!({"message": "the build is green; merge when ready"})).await;
    wait_until("the announcement in B", Duration::from_secs(10), || {
        std::fs::read_to_string(&log_b).unwrap_or_default().contains("[RELAY] 1 new message in e2e from alice. Use read_new_messages.")
    });
    let b_log = std::fs::read_to_string(&log_b).unwrap();
    assert!(!b_log.contains("merge when ready"), "message content was typed into the agent:\n{b_log}");
    assert_eq!(b_log.matches("new message").count(), 1, "{b_log}");
    assert!(!std::fs::read_to_string(&log_a).unwrap().contains("new message"), "the sender was told of its own message");
    // B's sidebar shows it
    let sidebar_b = sidebars(&pane_b).remove(0);
    wait_until("the sidebar", Duration::from_secs(10), || {
        relay_tmux::capture(&t.tmux, &sidebar_b).unwrap_or_default().contains("the build is green")
    });
    // B is a stand-in, not Claude Code: its sidebar types, says so, and relay status too
    wait_until("the sidebar to say it types", Duration::from_secs(10), || {
        relay_tmux::capture(&t.tmux, &sidebar_b).unwrap_or_default().contains("typing")
    });
    wait_until("relay status to say B's messages are typed", Duration::from_secs(10), || {
        let status = String::from_utf8_lossy(&t.relay(&socket, &["status"], &[]).stdout).into_owned();
        status.contains(&format!("⌨ {pane_b}: messages are typed into the pane"))
    });
    // (for the record: what the sidebars cost)
    let rss = Command::new("ps").args(["-C", "relay-pane", "-o", "rss="]).output().unwrap();
    eprintln!("relay-pane RSS (KiB): {}", String::from_utf8_lossy(&rss.stdout).split_whitespace().collect::<Vec<_>>().join(", "));
    // and B reads it through its own relay mcp
    let b = mcp(&socket, &pane_b).await;
    let inbox = call(&b, "read_new_messages", json!({})).await;
    assert_eq!(inbox["messages"][0]["text"], "the build is green; merge when ready");

    // a DM to B: its own announcement, and a desktop notification
    call(&a, "send_dm", json!({"to": "bob", "message": "can you take the review?"})).await;
    wait_until("the DM announcement", Duration::from_secs(10), || {
        std::fs::read_to_string(&log_b).unwrap_or_default().contains("[RELAY] 1 new DM in e2e from alice. Use read_new_messages.")
    });
    let mut shown = None;
    wait_until("a desktop notification", Duration::from_secs(10), || {
        shown = desktop.shown();
        shown.is_some()
    });
    let shown = shown.unwrap();
    assert!(shown.contains("DM from alice in e2e") && shown.contains("can you take the review?"), "{shown}");

    // relayd restarts: the sidebar reconnects and catches up
    relayd.kill_hard();
    let (relayd_again, _) = start_relayd();
    relayd = relayd_again;
    call(&a, "send_message", json!({"message": "sent while relayd restarted"})).await;
    wait_until("the sidebar to catch up after a relayd restart", Duration::from_secs(15), || {
        relay_tmux::capture(&t.tmux, &sidebar_b).unwrap_or_default().contains("sent while relayd")
    });

    // detach removes the sidebar and the peer
    let out = t.relay(&socket, &["detach", &pane_b], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("the sidebar to close", Duration::from_secs(10), || sidebars(&pane_b).is_empty());
    let peers = call(&a, "list_peers", json!({})).await;
    let names: Vec<&str> = peers["peers"].as_array().unwrap().iter().map(|p| p["display_name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alice"]);

    // the agent's pane closes: its sidebar goes too
    let sidebar_a = sidebars(&pane_a).remove(0);
    relay_tmux::kill_pane(&t.tmux, &pane_a).unwrap();
    wait_until("A's sidebar to exit with its agent", Duration::from_secs(10), || relay_tmux::pane(&t.tmux, &sidebar_a).is_err());

    let _ = a.cancel().await;
    let _ = b.cancel().await;
    relayd.kill_hard();
    drop(t);
}

/// Two stand-in agents, alice (pane a) and bob (pane b), attached to `group` in a tmux
/// server whose panes see a desktop's session bus and `settings` (RELAY_* variables).
struct TwoAgents {
    t: TmuxServer,
    dir: tempfile::TempDir,
    _server: ServerProcess,
    relayd: relay_e2e::KillOnDrop,
    socket: PathBuf,
    pane_a: String,
    pane_b: String,
}

impl TwoAgents {
    fn start(test: &str, group: &str, desktop: &Desktop, settings: &[(&str, &str)]) -> Option<TwoAgents> {
        let mut env: Vec<(String, String)> =
            vec![("DBUS_SESSION_BUS_ADDRESS".into(), desktop.bus.clone()), ("PATH".into(), std::env::var("PATH").unwrap_or_default())];
        env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let t = TmuxServer::start_with_env(test, group, &env)?;
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(0, &["--ephemeral"]);
        let (relayd, socket) = spawn_relayd(dir.path(), &server.url(""), &["--no-notifications"], &[], Stdio::null());
        let agent = stand_in_agent(dir.path());
        let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
        let pane_a = t.new_pane("/tmp", &format!("python3 {} {}", agent.display(), log_a.display()));
        let pane_b = t.new_pane("/", &format!("python3 {} {}", agent.display(), log_b.display()));
        wait_until("relayd and the agents", Duration::from_secs(10), || socket.exists() && log_a.exists() && log_b.exists());
        for (pane, name) in [(&pane_a, "alice"), (&pane_b, "bob")] {
            let out = t.relay(&socket, &["attach", pane, "--group", group, "--name", name, "--no-mcp-config"], &[]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let two = TwoAgents { t, dir, _server: server, relayd, socket, pane_a, pane_b };
        wait_until("bob's introduction", Duration::from_secs(10), || two.b_log().contains("You are bob"));
        Some(two)
    }

    /// What bob's agent has read from its terminal.
    fn b_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("b.log")).unwrap_or_default()
    }
}

/// The keystroke path never garbles what a human is typing: an announcement waits while a
/// line is half-typed, goes in once it is submitted, and after waiting too long the message
/// is marked failed and the human gets a desktop notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keystrokes_wait_for_a_half_typed_line_and_give_up_loudly() {
    let test = "keystrokes_wait_for_a_half_typed_line_and_give_up_loudly";
    let Some(desktop) = Desktop::start(test) else { return };
    let Some(mut w) = TwoAgents::start(test, "keys", &desktop, &[("RELAY_QUIET_MS", "150"), ("RELAY_PATIENCE_SECS", "3")]) else { return };
    let (t, pane_b) = (&w.t, w.pane_b.clone());
    let b_log = || w.b_log();
    let a = mcp(&w.socket, &w.pane_a).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // sidebars subscribed

    // the human at bob's pane has typed half a line
    relay_tmux::send_literal(&t.tmux, &pane_b, "deploy to stag").unwrap();
    call(&a, "send_message", json!({"message": "the build is green"})).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let screen = relay_tmux::capture(&t.tmux, &pane_b).unwrap();
    assert!(!screen.contains("[RELAY] 1 new message"), "typed into a half-typed line:\n{screen}");
    assert!(!b_log().contains("new message"));
    // the human finishes the line: it arrives whole, then the announcement on its own line
    relay_tmux::send_literal(&t.tmux, &pane_b, "ing").unwrap();
    relay_tmux::send_enter(&t.tmux, &pane_b).unwrap();
    wait_until("the announcement after the human's line", Duration::from_secs(10), || b_log().contains("new message"));
    let lines: Vec<String> = b_log().lines().map(str::to_owned).collect();
    let human = lines.iter().position(|l| l == "deploy to staging").unwrap_or_else(|| panic!("the human's line was garbled: {lines:?}"));
    let announced = lines
        .iter()
        .position(|l| l == "[RELAY] 1 new message in keys from alice. Use read_new_messages.")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(human < announced, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("new message")).count(), 1, "{lines:?}");

    // a half-typed line that is never finished: the message fails, and the human is told
    relay_tmux::send_literal(&t.tmux, &pane_b, "thinking about it").unwrap();
    let sent = call(&a, "send_dm", json!({"to": "bob", "message": "are you there?"})).await;
    let id = sent["message_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = call(&a, "message_status", json!({"message_id": id})).await;
        if status["recipients"][0]["state"] == "failed" {
            assert!(status["recipients"][0]["detail"].as_str().unwrap().contains("someone is typing"), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "never failed: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut shown = None;
    wait_until("the desktop notification", Duration::from_secs(10), || {
        shown = desktop.shown();
        shown.is_some()
    });
    assert!(shown.as_deref().unwrap().contains("not delivered"), "{shown:?}");
    assert_eq!(relay_tmux::capture(&t.tmux, &pane_b).unwrap().matches("thinking about it").count(), 1);
    assert!(!b_log().contains("thinking about it"), "the human's half line was never submitted by relay");
    let _ = a.cancel().await;
    w.relayd.kill_hard();
}

/// A message announced but not read gets one reminder, then the human is told; one the
/// agent reads gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_message_is_announced_once_more_then_the_human_is_told() {
    let test = "an_unread_message_is_announced_once_more_then_the_human_is_told";
    let Some(desktop) = Desktop::start(test) else { return };
    let Some(mut w) = TwoAgents::start(test, "remind", &desktop, &[("RELAY_QUIET_MS", "100"), ("RELAY_RENOTIFY_SECS", "2")]) else {
        return;
    };
    let announced = || w.b_log().matches("[RELAY] 1 new DM in remind from alice").count();
    let reminded = || w.b_log().matches("[RELAY] Reminder: 1 unread DM in remind from alice. Use read_new_messages.").count();
    let a = mcp(&w.socket, &w.pane_a).await;
    let b = mcp(&w.socket, &w.pane_b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // read at once: no reminder
    call(&a, "send_dm", json!({"to": "bob", "message": "first"})).await;
    wait_until("the first announcement", Duration::from_secs(10), || announced() == 1);
    call(&b, "read_new_messages", json!({})).await;
    // not read: one reminder after 2 s, then the human hears of it
    call(&a, "send_dm", json!({"to": "bob", "message": "second"})).await;
    wait_until("the second announcement", Duration::from_secs(10), || announced() == 2);
    wait_until("the reminder", Duration::from_secs(10), || reminded() == 1);
    let mut shown = None;
    wait_until("the desktop notification", Duration::from_secs(15), || {
        shown = desktop.shown();
        shown.is_some()
    });
    assert!(shown.as_deref().unwrap().contains("unread"), "{shown:?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!((announced(), reminded()), (2, 1), "one reminder, no more: {}", w.b_log());
    let _ = a.cancel().await;
    let _ = b.cancel().await;
    w.relayd.kill_hard();
}
