//! The real Claude Code CLI, offline, talking through relay with no keystroke typed.
//!
//! A scripted stand-in for the Messages API (`python/fake_anthropic.py`) plays the model.
//! Each "machine" is a private HOME and runtime dir with its own relayd and its own tmux
//! server; one relay-server serves them all. Claude Code sessions run in tmux panes and are
//! attached with `relay attach`; relay-pane delivers into their inbox sockets.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relay_e2e::tmux::{TmuxServer, call_tool, relay_mcp};
use relay_e2e::{KillOnDrop, ServerProcess, binary, claude_code, claude_command, spawn_relayd};
use relay_tmux::Tmux;
use serde_json::{Value, json};

const API_KEY: &str = "sk-ant-api03-relay-test-key-0123456789abcdefXYZ";
const CLAUDE_VERSION: &str = "2.1.332";

/// The scripted model: one stand-in API for every session.
struct Model {
    rules: PathBuf,
    log: PathBuf,
    port: u16,
    _child: KillOnDrop,
}

impl Model {
    fn start(dir: &Path) -> Model {
        let python = std::env::var_os("RELAY_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("python3"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/fake_anthropic.py");
        let (rules, log, port_file) = (dir.join("rules.json"), dir.join("requests.jsonl"), dir.join("port"));
        std::fs::write(&rules, "{}").unwrap();
        let child = Command::new(python)
            .arg(script)
            .arg("--rules")
            .arg(&rules)
            .arg("--log")
            .arg(&log)
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the stand-in Messages API");
        let child = KillOnDrop(child);
        wait_until("the stand-in API", Duration::from_secs(10), || port_file.exists());
        let port = std::fs::read_to_string(&port_file).unwrap().trim().parse().unwrap();
        Model { rules, log, port, _child: child }
    }

    fn script(&self, rules: Value) {
        std::fs::write(&self.rules, json!({"rules": rules, "default": {"text": "ok"}}).to_string()).unwrap();
    }

    /// Every request so far, as the latest turn's text (what the model was just told), and
    /// whether that turn carried a tool result.
    fn turns(&self) -> Vec<(String, bool)> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).map(|r| latest_turn(&r["body"])).collect()
    }

    /// Waits for a request whose latest turn contains `needle`; returns that turn.
    fn wait_for(&self, needle: &str, limit: Duration) -> (String, bool) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.turns().into_iter().find(|(text, _)| text.contains(needle)) {
                return found;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let seen: Vec<String> = log
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .map(|r| {
                        let (turn, _) = latest_turn(&r["body"]);
                        let turn: String = turn.chars().rev().take(300).collect::<Vec<_>>().into_iter().rev().collect();
                        format!("…{turn}\n  → {}", r["reply"])
                    })
                    .collect();
                panic!("no model request with {needle:?}; the requests' latest turns:\n{}", seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last user message's text and tool results, plus the system-role messages after it.
fn latest_turn(body: &Value) -> (String, bool) {
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let Some(last_user) = messages.iter().rposition(|m| m["role"] == "user") else { return (String::new(), false) };
    let mut tool_result = false;
    let mut parts = Vec::new();
    for m in &messages[last_user..] {
        match &m["content"] {
            Value::String(s) => parts.push(s.clone()),
            Value::Array(blocks) => {
                for b in blocks {
                    if b["type"] == "tool_result" {
                        tool_result |= m["role"] == "user";
                        parts.push(b["content"].to_string());
                    } else if let Some(t) = b["text"].as_str() {
                        parts.push(t.to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    (parts.join("\n"), tool_result)
}

fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One machine: a HOME, a runtime dir, a relayd, a tmux server whose panes inherit them.
struct Machine {
    home: PathBuf,
    work: PathBuf,
    socket: PathBuf,
    env: Vec<(String, String)>,
    tmux: TmuxServer,
    relayd: KillOnDrop,
}

impl Machine {
    fn start(test: &str, name: &str, root: &Path, server: &ServerProcess, model: &Model, claude: &Path) -> Option<Machine> {
        let dir = root.join(name);
        let (home, run, work, bin) = (dir.join("home"), dir.join("run"), dir.join("work"), dir.join("bin"));
        for d in [&home, &run, &work, &bin] {
            std::fs::create_dir_all(d).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(claude, bin.join("claude")).unwrap();
        let work = std::fs::canonicalize(&work).unwrap();
        let (relayd, socket) = spawn_relayd(&dir, &server.url(""), &["--no-notifications"], &[], Stdio::null());
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut env: Vec<(String, String)> = [
            ("HOME", home.display().to_string()),
            ("XDG_RUNTIME_DIR", run.display().to_string()),
            ("PATH", path),
            ("RELAYD_SOCKET", socket.display().to_string()),
            ("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{}", model.port)),
            ("ANTHROPIC_API_KEY", API_KEY.to_owned()),
            ("IS_SANDBOX", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for quiet in [
            "DISABLE_TELEMETRY",
            "DISABLE_AUTOUPDATER",
            "DISABLE_ERROR_REPORTING",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
            "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL",
        ] {
            env.push((quiet.to_owned(), "1".to_owned()));
        }
        let tmux = TmuxServer::start_with_env(test, name, &env)?;
        wait_until("relayd", Duration::from_secs(10), || socket.exists());
        // first-run screens answered, the work dir trusted, relay's tools allowed
        let config = json!({
            "hasCompletedOnboarding": true, "lastOnboardingVersion": CLAUDE_VERSION, "theme": "dark",
            "hasSeenAutoDefaultNudge": true,
            "customApiKeyResponses": {"approved": [&API_KEY[API_KEY.len() - 20..]], "rejected": []},
            "projects": {work.display().to_string(): {"hasTrustDialogAccepted": true}},
        });
        std::fs::write(home.join(".claude.json"), config.to_string()).unwrap();
        std::fs::create_dir_all(home.join(".claude")).unwrap();
        let settings = json!({
            "permissions": {"defaultMode": "default", "allow": ["mcp__relay", "Bash(sleep:*)"]},
            "skipDangerousModePermissionPrompt": true,
        });
        std::fs::write(home.join(".claude/settings.json"), settings.to_string()).unwrap();
        Some(Machine { home, work, socket, env, tmux, relayd })
    }

    /// Adds `relay mcp` to this machine's Claude Code, as an earlier `relay attach` would.
    fn configure_relay_mcp(&self, claude: &Path) {
        let out = claude_command(claude, &self.home)
            .args(["mcp", "add", "-s", "user", "relay", "--"])
            .arg(binary("relay"))
            .arg("mcp")
            .output()
            .unwrap();
        assert!(out.status.success(), "claude mcp add: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Starts Claude Code in a new pane and waits for its session to be idle; the pane id.
    fn start_claude(&self, args: &str) -> String {
        let pane = self.tmux.new_pane(&self.work.display().to_string(), &format!("claude --debug {args}"));
        let sessions = self.home.join(".claude/sessions");
        let ready = || {
            let Ok(entries) = std::fs::read_dir(&sessions) else { return false };
            entries.flatten().any(|e| {
                let v: Value = std::fs::read_to_string(e.path()).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
                v["tmux"].as_str().is_some_and(|t| t.ends_with(&format!(".{pane}"))) && v["status"] == "idle"
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(Instant::now() < deadline, "Claude Code in {pane} never became idle; its screen:\n{}", self.screen(&pane));
            std::thread::sleep(Duration::from_millis(50));
        }
        pane
    }

    fn attach(&self, pane: &str, name: &str) -> String {
        let out = self.tmux.relay(&self.socket, &["attach", pane, "--group", "cc", "--name", name], &self.env);
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "relay attach {pane}: {said}");
        said
    }

    fn screen(&self, pane: &str) -> String {
        self.tmux.tmux.run(&["capture-pane", "-p", "-S", "-", "-t", pane]).unwrap_or_default()
    }

    /// Types a prompt, as the human at this pane would.
    fn prompt(&self, pane: &str, text: &str) {
        relay_tmux::send_literal(&self.tmux.tmux, pane, text).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        relay_tmux::send_enter(&self.tmux.tmux, pane).unwrap();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.relayd.kill_hard();
    }
}

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    server: ServerProcess,
    model: Model,
    claude: PathBuf,
}

fn world(test: &str) -> Option<World> {
    let claude = claude_code(test)?;
    let mut dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    // RELAY_TEST_KEEP=1 keeps the homes, logs and transcripts for a look afterwards
    if std::env::var_os("RELAY_TEST_KEEP").is_some() {
        eprintln!("keeping {}", root.display());
        dir.disable_cleanup(true);
    }
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let model = Model::start(&root);
    Some(World { _dir: dir, root, server, model, claude })
}

impl World {
    fn machine(&self, test: &str, name: &str) -> Option<Machine> {
        Machine::start(test, name, &self.root, &self.server, &self.model, &self.claude)
    }
}

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
    let _ = a_client.cancel().await;
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
