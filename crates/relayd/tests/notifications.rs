//! Desktop notifications for DMs: a real session bus (dbus-daemon) with a real notification
//! server (dunst on Xvfb), and the path with no bus at all.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use relay_e2e::desktop::Desktop;
use relay_e2e::mcp::{Client as Mcp, Mode};
use relay_e2e::{KillOnDrop, ServerProcess, spawn_relayd};
use relay_local::client::Client;
use relay_proto::local::{AttachRequest, Reply, Request};
use serde_json::json;

fn relayd(dir: &Path, server: &str, bus: &str) -> (KillOnDrop, PathBuf) {
    let log = std::fs::File::create(dir.join("relayd.log")).unwrap();
    spawn_relayd(dir, server, &[], &[("DBUS_SESSION_BUS_ADDRESS", bus)], log.into())
}

async fn attached_pane(socket: &Path) -> String {
    for _ in 0..500 {
        if let Ok(mut c) = Client::connect(socket, "test").await {
            let req =
                AttachRequest { pane: "%4".into(), group: "team".into(), working_directory: "/src/mine".into(), ..Default::default() };
            match c.request(&Request::Attach(req)).await.unwrap() {
                Reply::Attached { attachment, .. } => return attachment.peer_id,
                other => panic!("{other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("relayd never opened its socket")
}

/// A peer of the group on another machine.
async fn far_peer(server: &ServerProcess) -> Mcp {
    let anon = Mcp::connect(&server.url("/mcp"), None, Mode::Stateless).await;
    let reg = anon.ok("register", json!({"group_id": "team", "hostname": "far", "working_directory": "/far"})).await;
    Mcp::connect(&server.url("/mcp"), Some(reg["token"].as_str().unwrap()), Mode::Stateless).await
}

async fn dm(far: &Mcp, to: &str, text: &str) {
    far.ok("send_dm", json!({"to": to, "message": text})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dm_shows_a_desktop_notification() {
    let Some(desktop) = Desktop::start("a_dm_shows_a_desktop_notification") else { return };
    let server = ServerProcess::start(0, &["--ephemeral"]);
    let dir = tempfile::tempdir().unwrap();
    let (_relayd, socket) = relayd(dir.path(), &server.url(""), &desktop.bus);
    let peer_id = attached_pane(&socket).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the upstream connects

    dm(&far_peer(&server).await, &peer_id, "can you review my branch?").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let history = loop {
        if let Some(shown) = desktop.shown() {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "no notification shown; relayd log:\n{}",
            std::fs::read_to_string(dir.path().join("relayd.log")).unwrap()
        );
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
    let (_relayd, socket) = relayd(dir.path(), &server.url(""), "unix:path=/nonexistent/relay-test-bus");
    let peer_id = attached_pane(&socket).await;
    let mut sub = Client::connect(&socket, "test").await.unwrap();
    assert!(matches!(
        sub.request(&Request::Subscribe { pane: "%4".into(), since: Default::default() }).await.unwrap(),
        Reply::Subscribed { .. }
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let far = far_peer(&server).await;
    dm(&far, &peer_id, "first").await;
    dm(&far, &peer_id, "second").await;
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
