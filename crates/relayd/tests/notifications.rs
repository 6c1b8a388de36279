//! Desktop notifications for DMs: a real session bus (dbus-daemon) with a real notification
//! server (dunst on Xvfb), and the path with no bus at all.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relay_e2e::mcp::{Client as Mcp, Mode};
use relay_e2e::{ServerProcess, require, spawn_relayd};
use relay_proto::local::{AttachRequest, Reply, Request};
use relayd::client::Client;
use serde_json::json;

/// Children killed by PID when the test ends, however it ends.
#[derive(Default)]
struct Children(Vec<Child>, Vec<relay_e2e::KillOnDrop>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

/// A private session bus: its address, with the daemon among `children`.
fn session_bus(children: &mut Children) -> String {
    let mut bus = Command::new("dbus-daemon")
        .args(["--session", "--nofork", "--print-address=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dbus-daemon");
    let mut line = String::new();
    BufReader::new(bus.stdout.take().unwrap()).read_line(&mut line).unwrap();
    children.0.push(bus);
    line.trim().to_owned()
}

/// An X display on Xvfb, with dunst showing notifications on it.
fn notification_server(bus: &str, children: &mut Children) {
    let mut xvfb = Command::new("Xvfb")
        .args(["-displayfd", "1", "-nolisten", "tcp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start Xvfb");
    let mut display = String::new();
    let mut out = xvfb.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        display.push(byte[0] as char);
    }
    children.0.push(xvfb);
    let dunst = Command::new("dunst")
        .env("DISPLAY", format!(":{}", display.trim()))
        .env("DBUS_SESSION_BUS_ADDRESS", bus)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start dunst");
    children.0.push(dunst);
}

fn dunstctl(bus: &str, args: &[&str]) -> String {
    let out = Command::new("dunstctl").args(args).env("DBUS_SESSION_BUS_ADDRESS", bus).output().expect("dunstctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn relayd(dir: &Path, server: &str, bus: &str, children: &mut Children) -> PathBuf {
    let log = std::fs::File::create(dir.join("relayd.log")).unwrap();
    let (child, socket) = spawn_relayd(dir, server, &[], &[("DBUS_SESSION_BUS_ADDRESS", bus)], log.into());
    children.1.push(child);
    socket
}

async fn attached_pane(socket: &Path) -> String {
    for _ in 0..500 {
        if let Ok(mut c) = Client::connect(socket, "test").await {
            let req = AttachRequest { pane: "%4".into(), group: "team".into(), working_directory: "/src/mine".into(), ..Default::default() };
            match c.request(&Request::Attach(req)).await.unwrap() {
                Reply::Attached { attachment, .. } => return attachment.peer_id,
                other => panic!("{other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("relayd never opened its socket")
}

async fn dm(server: &ServerProcess, to: &str, text: &str) {
    let anon = Mcp::connect(&server.url("/mcp"), None, Mode::Stateless).await;
    let reg = anon.ok("register", json!({"group_id": "team", "hostname": "far", "working_directory": "/far"})).await;
    let far = Mcp::connect(&server.url("/mcp"), Some(reg["token"].as_str().unwrap()), Mode::Stateless).await;
    far.ok("send_dm", json!({"to": to, "message": text})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_shows_a_desktop_notification() {
    let test = "a_dm_shows_a_desktop_notification";
    let tools = ["dbus-daemon", "Xvfb", "dunst", "dunstctl"];
    let found = tools.iter().all(|t| which(t).is_some()).then(|| PathBuf::from("/"));
    if require(test, "dbus-daemon, Xvfb and dunst", found).is_none() {
        return;
    }
    let mut children = Children::default();
    let bus = session_bus(&mut children);
    notification_server(&bus, &mut children);
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let dir = tempfile::tempdir().unwrap();
    let socket = relayd(dir.path(), &server.url(""), &bus, &mut children);
    let peer_id = attached_pane(&socket).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the upstream connects

    dm(&server, &peer_id, "can you review my branch?").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let history = loop {
        if dunstctl(&bus, &["count", "displayed"]).trim() != "0" {
            dunstctl(&bus, &["close-all"]);
            tokio::time::sleep(Duration::from_millis(200)).await;
            break dunstctl(&bus, &["history"]);
        }
        assert!(Instant::now() < deadline, "no notification shown; relayd log:\n{}", std::fs::read_to_string(dir.path().join("relayd.log")).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(history.contains("DM from far:far in team"), "{history}");
    assert!(history.contains("can you review my branch?"), "{history}");
    assert!(history.contains("\"relay\""), "appname: {history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_session_bus_relayd_says_so_once_and_goes_on() {
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let dir = tempfile::tempdir().unwrap();
    let mut children = Children::default();
    let socket = relayd(dir.path(), &server.url(""), "unix:path=/nonexistent/relay-test-bus", &mut children);
    let peer_id = attached_pane(&socket).await;
    let mut sub = Client::connect(&socket, "test").await.unwrap();
    assert!(matches!(
        sub.request(&Request::Subscribe { pane: "%4".into(), since: Default::default() }).await.unwrap(),
        Reply::Subscribed { .. }
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    dm(&server, &peer_id, "first").await;
    dm(&server, &peer_id, "second").await;
    // the pane still gets both DMs
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("DM delivered").unwrap() {
            Reply::Event { event, .. } if event.kind == relay_proto::EventKind::Dm => got.push(event.preview),
            _ => {}
        }
    }
    assert_eq!(got, ["first", "second"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = std::fs::read_to_string(dir.path().join("relayd.log")).unwrap();
    assert_eq!(log.matches("desktop notifications are unavailable").count(), 1, "{log}");
}
