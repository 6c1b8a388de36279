//! The console in a real browser: a human signs in with the link `relay console` prints,
//! watches a group whose agents run on three machines (three relayds: two of the human's,
//! paired, and another person's), sees what is theirs live and nothing that is not, DMs an
//! agent that reads it, and hostile text stays text. Chromium from Debian, driven by
//! Playwright from PyPI (tests/python/console_browser.py); a screenshot is left in target/.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use relay_e2e::tmux::{TmuxServer, stand_in_agent};
use relay_e2e::{ServerProcess, binary, spawn_relayd, wait_until};
use serde_json::{Value, json};

/// One machine: a relayd of its own.
struct Machine {
    socket: std::path::PathBuf,
    _relayd: relay_e2e::KillOnDrop,
}

fn relay(machine: &Machine, args: &[&str]) -> String {
    let out = Command::new(binary("relay"))
        .args(args)
        .env("RELAYD_SOCKET", &machine.socket)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .stdin(Stdio::null())
        .output()
        .expect("run relay");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "relay {args:?}: {said}");
    said
}

/// A command the browser script runs to make an agent act: `relay ARGS` on `machine`.
fn command(machine: &Machine, args: &[&str]) -> Value {
    let mut argv = vec![binary("relay").display().to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    json!({"argv": argv, "env": {"RELAYD_SOCKET": machine.socket.display().to_string()}})
}

#[test]
fn a_human_watches_and_talks_to_agents_on_two_machines_in_a_browser() {
    let test = "a_human_watches_and_talks_to_agents_on_two_machines_in_a_browser";
    let Some(python) = relay_e2e::python_with_mcp(test) else { return };
    let Some(chromium) = relay_e2e::chromium(test) else { return };
    let Some(t) = TmuxServer::start(test, "console") else { return };
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let other_server = ServerProcess::start(0, &["--ephemeral"]);
    let machine = |name: &str| {
        let home = dir.path().join(name);
        std::fs::create_dir_all(&home).unwrap();
        let (relayd, socket) = spawn_relayd(&home, &server.url(""), &[], &[], Stdio::null());
        wait_until("relayd", Duration::from_secs(10), || socket.exists());
        Machine { socket, _relayd: relayd }
    };
    let (laptop, cloud, other_person) = (machine("laptop"), machine("cloud"), machine("other"));
    let agent = stand_in_agent(dir.path());
    let mut panes = std::collections::HashMap::new();
    for (m, name) in [(&laptop, "alice"), (&cloud, "carol"), (&other_person, "bob1"), (&other_person, "bob2")] {
        let log = dir.path().join(format!("{name}.log"));
        let pane = t.new_pane("/tmp", &format!("python3 {} {}", agent.display(), log.display()));
        wait_until("the stand-in agent", Duration::from_secs(10), || log.exists());
        let out = t.relay(&m.socket, &["attach", &pane, "--group", "team", "--name", name, "--no-mcp-config"], &[]);
        assert!(out.status.success(), "attach {name}: {}", String::from_utf8_lossy(&out.stderr));
        panes.insert(name, (pane, log));
    }
    let pane = |name: &str| panes[name].0.clone();

    // alice's sidebar says her Claude Code session is busy (a stand-in agent has none, so the
    // frame a sidebar sends is sent here): relayd passes it on for the console's peers panel
    let busy = relay_proto::local::Request::Delivery {
        pane: pane("alice"),
        path: relay_proto::local::DeliveryPath::Inbox,
        activity: Some("busy".into()),
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = relay_local::client::Client::connect(&laptop.socket, "console test").await.unwrap();
        let noted = client.request(&busy).await.unwrap();
        assert!(matches!(noted, relay_proto::local::Reply::Noted { .. }), "{noted:?}");
    });

    // the cloud box's relayd acts for the same human as the laptop's
    let paired = relay(&laptop, &["console", "--pair", "--name", "ann"]);
    let code = paired.split("--pair-with ").nth(1).and_then(|rest| rest.split_whitespace().next()).expect("a pairing code").to_owned();
    assert!(relay(&cloud, &["console", "--pair-with", &code]).contains("now show in ann's console"));
    let said = relay(&laptop, &["console", "--no-open"]);
    let link = said.lines().map(str::trim).find(|l| l.starts_with("http://")).unwrap_or_else(|| panic!("no link in: {said}")).to_owned();
    assert!(link.starts_with(&server.url("/console/sign-in/")), "{link}");

    let texts = json!({
        "broadcast": "bob1 says hello to the group",
        "foreign_dm": "bob1 to bob2, nobody else's business",
        "after_foreign_dm": "bob1 again, to everyone",
        "own_dm": "carol on the cloud box to alice on the laptop",
        "human_dm": "alice, please rebase onto main",
        "forged": "sent by another site",
    });
    let hostile = "<script>alert(1)</script> <img src=x onerror=alert(2)> </div> \u{1b}[31mred\u{1b}[0m \u{202E}desrever";
    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console.png");
    let (bob1, alice) = (pane("bob1"), pane("alice"));
    let config = json!({
        "link": link,
        "group": "team",
        "human": "ann",
        "server": server.url(""),
        "other_server": other_server.url(""),
        // localhost is another site than 127.0.0.1, and an allowed host: its page loads
        "foreign_page": format!("http://localhost:{}/healthz", other_server.addr.port()),
        "dm_to": "alice",
        "busy_agent": "alice",
        "chromium": chromium,
        "screenshot": screenshot,
        "texts": texts,
        "commands": {
            "broadcast": command(&other_person, &["send", "--pane", &bob1, "--group", "team", texts["broadcast"].as_str().unwrap()]),
            "foreign_dm": command(&other_person, &["dm", "bob2", texts["foreign_dm"].as_str().unwrap(), "--pane", &bob1]),
            "after_foreign_dm": command(&other_person, &["send", "--pane", &bob1, "--group", "team", texts["after_foreign_dm"].as_str().unwrap()]),
            "own_dm": command(&cloud, &["dm", "alice", texts["own_dm"].as_str().unwrap(), "--pane", &pane("carol")]),
            "hostile": command(&other_person, &["send", "--pane", &bob1, "--group", "team", hostile]),
            "timed": command(&other_person, &["send", "--pane", &bob1, "--group", "team", "a timed message"]),
            "read_mcp": command(&laptop, &["mcp", "--pane", &alice]),
        },
    });
    let config_path = dir.path().join("console.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/console_browser.py");
    let out = Command::new(python).arg(script).arg(&config_path).output().expect("run the browser script");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("ok: console"), "the browser script failed:\n{stdout}\n{stderr}");
    eprintln!("console in chromium: {} (screenshot: {})", stdout.lines().last().unwrap_or_default(), screenshot.display());

    // the human's DM reached alice's pane framed as from a human of the group
    let alice_log = &panes["alice"].1;
    let announced = || std::fs::read_to_string(alice_log).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !announced().contains("ann (human)") {
        assert!(std::time::Instant::now() < deadline, "alice was not told of the human's DM:\n{}", announced());
        std::thread::sleep(Duration::from_millis(50));
    }
}
