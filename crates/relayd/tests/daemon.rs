//! relayd in-process against a real relay-server on 127.0.0.1:0.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_e2e::mcp::{Client as Mcp, Mode};
use relay_local::client::Client;
use relay_local::notify::{Notice, Notifier};
use relay_proto::local::{AttachRequest, ErrorCode, Reply, Request, SendRequest};
use relay_proto::{DeliveryState, MessageKind, Receipt};
use relayd::Config;
use serde_json::json;
use tokio_util::sync::CancellationToken;

struct Server {
    url: String,
    relay: Arc<relay_server::Relay>,
    shutdown: CancellationToken,
}

async fn server() -> Server {
    server_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
}

fn server_config() -> relay_server::Config {
    relay_server::Config { ephemeral: true, rate_burst: 100_000, rate_per_second: 100_000.0, ..Default::default() }
}

/// A server with nothing stored (`ephemeral`), on `listener`.
fn server_on(listener: tokio::net::TcpListener) -> Server {
    serve_with(listener, server_config())
}

fn serve_with(listener: tokio::net::TcpListener, config: relay_server::Config) -> Server {
    let url = format!("http://{}", listener.local_addr().unwrap());
    let store = relay_server::open_store(&config).unwrap();
    let relay = Arc::new(relay_server::Relay::new(store, Arc::new(relay_server::clock::SystemClock), config.limits()));
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move { relay_server::serve(relay, &config, listener, shutdown).await.unwrap() }
    });
    Server { url, relay, shutdown }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Notice>>);

impl Notifier for Recorder {
    fn notify(&self, notice: Notice) {
        self.0.lock().unwrap().push(notice);
    }
}

struct Daemon {
    socket: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    notices: Arc<Recorder>,
}

fn daemon_config(dir: &std::path::Path, server: &str) -> Config {
    Config {
        server: server.to_owned(),
        socket: Some(dir.join("run/relayd.sock")),
        state_dir: Some(dir.join("state")),
        reconnect_max_secs: 1,
        ..Config::default()
    }
}

async fn start_daemon(dir: &std::path::Path, server: &str) -> Daemon {
    start_daemon_with(daemon_config(dir, server)).await
}

async fn start_daemon_with(config: Config) -> Daemon {
    let socket = config.socket_path();
    let shutdown = CancellationToken::new();
    let notices = Arc::new(Recorder::default());
    let task = tokio::spawn({
        let (shutdown, notices) = (shutdown.clone(), notices.clone());
        async move { relayd::run_with(config, notices, shutdown).await.unwrap() }
    });
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Daemon { socket, shutdown, task, notices }
}

impl Daemon {
    async fn client(&self) -> Client {
        Client::connect(&self.socket, "test").await.unwrap()
    }

    async fn attach(&self, pane: &str, group: &str, dir: &str) -> relay_proto::local::Attachment {
        let req = AttachRequest { pane: pane.into(), group: group.into(), working_directory: dir.into(), ..Default::default() };
        match self.client().await.request(&Request::Attach(req)).await.unwrap() {
            Reply::Attached { attachment, .. } => attachment,
            other => panic!("attach {pane}: {other:?}"),
        }
    }

    async fn subscribe(&self, pane: &str, since: &[(&str, u64)]) -> Client {
        let mut c = self.client().await;
        let since = since.iter().map(|(g, s)| (g.to_string(), *s)).collect();
        match c.request(&Request::Subscribe { pane: pane.into(), since }).await.unwrap() {
            Reply::Subscribed { .. } => c,
            other => panic!("subscribe {pane}: {other:?}"),
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("relayd stops").unwrap();
    }
}

/// Events that arrive within `wait`, as (kind, preview, seq).
async fn events(sub: &mut Client, wait: Duration) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    while let Ok(Ok(reply)) = tokio::time::timeout(wait, sub.next()).await {
        if let Reply::Event { event, .. } = reply {
            out.push((event.kind.as_str().to_owned(), event.preview, event.seq));
        }
    }
    out
}

async fn mcp_peer(server: &Server, group: &str, dir: &str) -> (Mcp, serde_json::Value) {
    let anon = Mcp::connect(&format!("{}/mcp", server.url), None, Mode::Stateless).await;
    let reg = anon.ok("register", json!({"group_id": group, "hostname": "far", "working_directory": dir})).await;
    let client = Mcp::connect(&format!("{}/mcp", server.url), Some(reg["token"].as_str().unwrap()), Mode::Stateless).await;
    (client, reg)
}

const WAIT: Duration = Duration::from_millis(400);

/// Polls `message_status` until the (only) recipient of `id` is in `state`; its entry.
async fn recipient_reaches(far: &Mcp, id: &str, state: &str, within: Duration) -> serde_json::Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let status = far.ok("message_status", json!({"message_id": id})).await;
        if status["recipients"][0]["state"] == state {
            return status["recipients"][0].clone();
        }
        assert!(std::time::Instant::now() < deadline, "never {state}: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_panes_share_one_upstream_and_get_what_is_theirs() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let mut panes = Vec::new();
    for i in 0..20 {
        panes.push(daemon.attach(&format!("%{i}"), "team", &format!("/src/p{i}")).await);
    }
    let mut subs = Vec::new();
    for i in 0..20 {
        subs.push(daemon.subscribe(&format!("%{i}"), &[]).await);
    }
    // one upstream for the group, however many panes
    let metrics = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut metrics = metrics;
    while !metrics.contains("relay_open_streams{kind=\"daemon\"} 1") {
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
    }
    let status = match daemon.client().await.request(&Request::Status).await.unwrap() {
        Reply::Status { status } => status,
        other => panic!("{other:?}"),
    };
    assert_eq!(status.upstreams.len(), 1);
    assert_eq!(status.upstreams[0].panes, 20);
    assert_eq!(status.attachments.len(), 20);

    // a broadcast from afar reaches all 20; a DM only its pane, with a desktop notice
    let (far, _) = mcp_peer(&server, "team", "/far").await;
    far.ok("send_message", json!({"message": "hello everyone"})).await;
    far.ok("send_dm", json!({"to": panes[5].peer_id, "message": "just you, five"})).await;
    // a pane's own broadcast reaches the 19 others, not itself
    let creds = match daemon.client().await.request(&Request::Credentials { pane: "%3".into() }).await.unwrap() {
        Reply::Credentials { credentials, .. } => credentials,
        other => panic!("{other:?}"),
    };
    let three = Mcp::connect(&format!("{}/mcp", server.url), Some(&creds[0].token), Mode::Stateless).await;
    three.ok("send_message", json!({"message": "from three"})).await;

    let all = futures::future::join_all(subs.iter_mut().map(|sub| events(sub, WAIT))).await;
    for (i, got) in all.into_iter().enumerate() {
        // (the panes' own joins may still be arriving; only the far peer's matters here)
        type KindAndPreview = Vec<(String, String)>;
        let (receipts, got): (KindAndPreview, KindAndPreview) = got
            .into_iter()
            .map(|(k, p, _)| (k, p))
            .filter(|(k, p)| k != "peer_joined" || p.starts_with("far:"))
            .partition(|(k, _)| k == "receipt");
        let mut want = vec![("peer_joined".to_owned(), "far:far joined team".to_owned()), ("message".into(), "hello everyone".into())];
        if i == 5 {
            want.push(("dm".into(), "just you, five".into()));
        }
        if i != 3 {
            want.push(("message".into(), "from three".into()));
        }
        // relayd told the server each pane has its copy: pane %3 hears of everyone's copy of
        // its message (a pane hears of its own copies only once they are read, held or failed)
        let mut want_receipts: Vec<String> = Vec::new();
        if i == 3 {
            want_receipts.extend((0..20).filter(|n| *n != 3).map(|n| format!("vm:p{n} delivered")));
        }
        let mut got_receipts: Vec<String> = receipts.into_iter().map(|(_, p)| p).collect();
        want_receipts.sort();
        got_receipts.sort();
        assert_eq!(got_receipts, want_receipts, "receipts of pane %{i}");
        assert_eq!(got, want, "pane %{i}");
    }
    let notices = daemon.notices.0.lock().unwrap().clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0].summary.contains("DM from far:far in team") && notices[0].body.contains("just you, five"), "{notices:?}");
    daemon.stop().await;
    server.shutdown.cancel();
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_goes_on() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;

    let mut raw = Client::connect(&daemon.socket, "t").await.unwrap();
    let mut fresh = relay_local::client::Client::connect(&daemon.socket, "t").await.unwrap();
    for (bytes, code) in [
        (&b"this is not json\n"[..], ErrorCode::BadFrame),
        (b"{\"type\":\"teleport\"}\n", ErrorCode::UnknownRequest),
        (b"{\"type\":\"attach\"}\n", ErrorCode::BadFrame),
        (b"\xff\xfe\n", ErrorCode::BadFrame),
    ] {
        raw.send_raw(bytes).await.unwrap();
        match raw.next().await.unwrap() {
            Reply::Error { code: got, .. } => assert_eq!(got, code, "{:?}", String::from_utf8_lossy(bytes)),
            other => panic!("{other:?}"),
        }
    }
    let huge = vec![b'x'; relay_proto::local::MAX_FRAME_BYTES + 10];
    raw.send_raw(&huge).await.unwrap();
    raw.send_raw(b"\n").await.unwrap();
    assert!(matches!(raw.next().await.unwrap(), Reply::Error { code: ErrorCode::TooLarge, .. }));
    // still talking
    assert!(matches!(raw.request(&Request::Status).await.unwrap(), Reply::Status { .. }));
    assert!(matches!(fresh.request(&Request::Status).await.unwrap(), Reply::Status { .. }));

    // a client that skips the hello, or speaks another version, is told so
    let socket = daemon.socket.clone();
    let (first, second) = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut ungreeted = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        ungreeted.write_all(b"{\"type\":\"status\"}\n{\"type\":\"hello\",\"version\":99,\"client\":\"x\"}\n").unwrap();
        let mut lines = std::io::BufReader::new(ungreeted).lines();
        (lines.next().unwrap().unwrap(), lines.next().unwrap().unwrap())
    })
    .await
    .unwrap();
    assert!(first.contains("\"code\":\"hello_first\""), "{first}");
    assert!(second.contains("\"code\":\"version_mismatch\""), "{second}");

    // detaching what is not attached
    match fresh.request(&Request::Detach { pane: "%9".into(), group: None }).await.unwrap() {
        Reply::Error { code: ErrorCode::NotAttached, message } => assert!(message.contains("%9")),
        other => panic!("{other:?}"),
    }
    daemon.stop().await;
    server.shutdown.cancel();
}

#[tokio::test]
async fn attach_is_idempotent_and_detach_leaves_the_group() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let first = daemon.attach("%1", "team", "/src/a").await;
    let mut c = daemon.client().await;
    let again = AttachRequest { pane: "%1".into(), group: "team".into(), working_directory: "/src/a".into(), ..Default::default() };
    match c.request(&Request::Attach(again)).await.unwrap() {
        Reply::Attached { attachment, already } => {
            assert!(already);
            assert_eq!(attachment.peer_id, first.peer_id);
        }
        other => panic!("{other:?}"),
    }
    let (far, _) = mcp_peer(&server, "team", "/far").await;
    let peers = far.ok("list_peers", json!({})).await;
    let pane_peer = peers["peers"].as_array().unwrap().iter().find(|p| p["peer_id"] == first.peer_id.as_str()).unwrap().clone();
    assert_eq!(pane_peer["online"], true, "a daemon stream makes its panes online");

    match c.request(&Request::Detach { pane: "%1".into(), group: None }).await.unwrap() {
        Reply::Detached { groups, .. } => assert_eq!(groups, ["team"]),
        other => panic!("{other:?}"),
    }
    let peers = far.ok("list_peers", json!({})).await;
    assert_eq!(peers["peers"].as_array().unwrap().len(), 1, "{peers}");
    match c.request(&Request::Status).await.unwrap() {
        Reply::Status { status } => assert!(status.upstreams.is_empty() && status.attachments.is_empty()),
        other => panic!("{other:?}"),
    }
    // a group with a wrong join key is refused with the server's words
    anonymous_protected_group(&server).await;
    let locked = AttachRequest {
        pane: "%2".into(),
        group: "locked".into(),
        working_directory: "/x".into(),
        join_key: Some("wrong key!".into()),
        ..Default::default()
    };
    match c.request(&Request::Attach(locked)).await.unwrap() {
        Reply::Error { code: ErrorCode::Server, message } => assert!(message.contains("wrong join key"), "{message}"),
        other => panic!("{other:?}"),
    }
    daemon.stop().await;
    server.shutdown.cancel();
}

async fn anonymous_protected_group(server: &Server) {
    let anon = Mcp::connect(&format!("{}/mcp", server.url), None, Mode::Stateless).await;
    anon.ok("register", json!({"group_id": "locked", "hostname": "h", "working_directory": "/", "join_key": "right key!"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_restores_attachments_and_subscribers_catch_up_once() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let pane = daemon.attach("%1", "team", "/src/a").await;
    let mut sub = daemon.subscribe("%1", &[]).await;
    let (far, _) = mcp_peer(&server, "team", "/far").await;
    far.ok("send_message", json!({"message": "before"})).await;
    let got = events(&mut sub, WAIT).await;
    let last_seen = got.last().unwrap().2;
    drop(sub);
    daemon.stop().await;
    assert!(!dir.path().join("run/relayd.sock").exists(), "the socket outlived the daemon");

    // while the daemon is down
    far.ok("send_message", json!({"message": "while down 1"})).await;
    far.ok("send_message", json!({"message": "while down 2"})).await;

    let daemon = start_daemon(dir.path(), &server.url).await;
    let mut sub = daemon.subscribe("%1", &[("team", last_seen)]).await;
    far.ok("send_message", json!({"message": "after"})).await;
    let got = events(&mut sub, Duration::from_secs(1)).await;
    let previews: Vec<String> = got.into_iter().filter(|(kind, _, _)| kind != "receipt").map(|(_, p, _)| p).collect();
    assert_eq!(previews, ["while down 1", "while down 2", "after"]);
    match daemon.client().await.request(&Request::Status).await.unwrap() {
        Reply::Status { status } => {
            assert_eq!(status.attachments[0].peer_id, pane.peer_id);
            assert_eq!(status.upstreams.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    let _ = &server.relay;
    daemon.stop().await;
    server.shutdown.cancel();
}

/// Another user cannot use the daemon: the socket's modes keep them out, and if the modes
/// were loosened the peer-uid check still refuses them. Needs root to act as another user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if relay_local::paths::euid() != 0 {
        eprintln!("SKIPPED: another_user_is_refused needs root to act as another user (the decision function is unit-tested)");
        return;
    }
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let probe = |socket: &std::path::Path| {
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n  s.connect(sys.argv[1])\nexcept OSError as e:\n  print('refused', e.errno); sys.exit()\ntry:\n  s.sendall(b'{\"type\":\"hello\",\"version\":1,\"client\":\"intruder\"}\\n')\n  s.settimeout(5)\n  print('reply', s.recv(200))\nexcept OSError:\n  print('reply', b'')";
        let out = std::process::Command::new("python3").args(["-c", script]).arg(socket).uid(65534).gid(65534).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if said.is_empty() { format!("python failed: {}", String::from_utf8_lossy(&out.stderr)) } else { said }
    };
    let socket = daemon.socket.clone();
    // as installed: the modes alone keep another user out
    let denied = tokio::task::spawn_blocking({
        let socket = socket.clone();
        move || probe(&socket)
    })
    .await
    .unwrap();
    assert!(denied.starts_with("refused"), "{denied}");
    // loosened on purpose: the daemon's own check hangs up without a word
    for path in [dir.path(), &dir.path().join("run"), &socket] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let hung_up = tokio::task::spawn_blocking(move || probe(&socket)).await.unwrap();
    assert_eq!(hung_up, "reply b''");
    // and the owner is still served
    assert!(matches!(daemon.client().await.request(&Request::Status).await.unwrap(), Reply::Status { .. }));
    daemon.stop().await;
    server.shutdown.cancel();
}

/// relayd speaks HTTPS to servers in the cloud: an https URL fails as a connection, not as
/// an unsupported scheme.
#[tokio::test]
async fn https_servers_are_supported() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let req = AttachRequest {
        pane: "%1".into(),
        group: "g".into(),
        server: Some(format!("https://{closed}")),
        working_directory: "/w".into(),
        ..Default::default()
    };
    match daemon.client().await.request(&Request::Attach(req)).await.unwrap() {
        Reply::Error { code: ErrorCode::Server, message } => {
            assert!(message.contains("cannot reach https://"), "{message}");
            assert!(!message.to_lowercase().contains("scheme"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    daemon.stop().await;
    server.shutdown.cancel();
}

/// Two agents in one directory are two peers: the second pane gets a name of its own
/// instead of taking over the first one's peer.
#[tokio::test]
async fn two_panes_in_one_directory_are_two_peers() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let first = daemon.attach("%1", "team", "/src/same").await;
    let second = daemon.attach("%7", "team", "/src/same").await;
    assert_ne!(first.peer_id, second.peer_id);
    assert_eq!(second.display_name, format!("{}-7", first.display_name));
    // both still speak for themselves
    for pane in ["%1", "%7"] {
        let creds = match daemon.client().await.request(&Request::Credentials { pane: pane.into() }).await.unwrap() {
            Reply::Credentials { credentials, .. } => credentials,
            other => panic!("{other:?}"),
        };
        let me = Mcp::connect(&format!("{}/mcp", server.url), Some(&creds[0].token), Mode::Stateless).await;
        let sent = me.ok("send_message", json!({"message": format!("from {pane}")})).await;
        assert_eq!(sent["from"]["peer_id"], creds[0].peer_id.as_str());
    }
    // the same explicit name from the same directory is refused, not taken over
    let clash = AttachRequest {
        pane: "%9".into(),
        group: "team".into(),
        working_directory: "/src/same".into(),
        name: Some("twin".into()),
        ..Default::default()
    };
    daemon.client().await.request(&Request::Attach(AttachRequest { pane: "%8".into(), ..clash.clone() })).await.unwrap();
    match daemon.client().await.request(&Request::Attach(clash)).await.unwrap() {
        Reply::Error { message, .. } => assert!(message.contains("already attached") && message.contains("--name"), "{message}"),
        other => panic!("{other:?}"),
    }
    daemon.stop().await;
    server.shutdown.cancel();
}

#[tokio::test]
async fn a_panes_reports_reach_the_sender_as_message_states() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let pane = daemon.attach("%4", "team", "/four").await;
    let mut sub = daemon.subscribe("%4", &[]).await;
    let (far, _) = mcp_peer(&server, "team", "/far").await;
    let sent = far.ok("send_dm", json!({"to": pane.peer_id, "message": "are you there?"})).await;
    let id = sent["message_id"].as_str().unwrap().to_owned();
    let reaches = |state: &'static str| recipient_reaches(&far, &id, state, WAIT);

    // relayd says delivered by itself; the pane gets the whole text to deliver
    let got = events(&mut sub, WAIT).await;
    assert!(got.iter().any(|(k, p, _)| k == "dm" && p == "are you there?"), "{got:?}");
    reaches("delivered").await;

    let report = |state: DeliveryState, detail: Option<&str>| Request::Report {
        pane: "%4".into(),
        receipts: vec![Receipt { message_id: id.clone(), group: "team".into(), state, detail: detail.map(str::to_owned) }],
    };
    let mut control = daemon.client().await;
    assert_eq!(
        control.request(&report(DeliveryState::Held, Some("waiting for the human"))).await.unwrap(),
        Reply::Reported { pane: "%4".into(), queued: 1 }
    );
    assert_eq!(reaches("held").await["detail"], "waiting for the human");
    let Reply::Status { status } = control.request(&Request::Status).await.unwrap() else { panic!() };
    assert_eq!(status.held, [("%4".to_owned(), 1)].into(), "relay status shows what is held");
    control.request(&report(DeliveryState::Read, None)).await.unwrap();
    reaches("read").await;
    let Reply::Status { status } = control.request(&Request::Status).await.unwrap() else { panic!() };
    assert!(status.held.is_empty(), "{:?}", status.held);
    // a pane that is not attached, or a group it is not in, is refused with a reason
    let mut wrong = report(DeliveryState::Read, None);
    if let Request::Report { receipts, .. } = &mut wrong {
        receipts[0].group = "elsewhere".into();
    }
    // a receipt for a group the pane is not in is dropped on its own; the rest go on
    assert_eq!(control.request(&wrong).await.unwrap(), Reply::Reported { pane: "%4".into(), queued: 0 });
    let err = control.request(&Request::Report { pane: "%99".into(), receipts: vec![] }).await.unwrap();
    assert!(matches!(err, Reply::Error { code: ErrorCode::NotAttached, .. }), "{err:?}");
    daemon.stop().await;
    server.shutdown.cancel();
}

/// What a sidebar asks of the server goes through relayd, as the pane's own peer.
#[tokio::test]
async fn a_pane_lists_peers_sends_and_asks_message_status_through_relayd() {
    let server = server().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &server.url).await;
    let pane = daemon.attach("%5", "team", "/five").await;
    let (far, far_reg) = mcp_peer(&server, "team", "/far").await;
    let mut control = daemon.client().await;

    let Reply::Peers { peers, .. } = control.request(&Request::Peers { pane: "%5".into() }).await.unwrap() else { panic!() };
    let mut names: Vec<_> = peers.iter().map(|p| (p.group_id.as_str(), p.peer_id.as_str())).collect();
    names.sort();
    let far_id = far_reg["peer_id"].as_str().unwrap();
    let mut expected = vec![("team", pane.peer_id.as_str()), ("team", far_id)];
    expected.sort();
    assert_eq!(names, expected);

    // a DM and a broadcast as the pane's peer; a repeated key sends nothing new
    let send = |to: Option<&str>, text: &str, key: &str| {
        Request::Send(SendRequest {
            pane: "%5".into(),
            group: "team".into(),
            to: to.map(str::to_owned),
            text: text.into(),
            idempotency_key: Some(key.into()),
        })
    };
    let Reply::Sent { sent: dm } = control.request(&send(Some(far_id), "hello far", "k1")).await.unwrap() else { panic!() };
    assert_eq!((dm.kind, dm.from.peer_id.as_str(), dm.repeated), (MessageKind::Dm, pane.peer_id.as_str(), false));
    let Reply::Sent { sent: again } = control.request(&send(Some(far_id), "hello far", "k1")).await.unwrap() else { panic!() };
    assert_eq!((again.message_id.as_str(), again.repeated), (dm.message_id.as_str(), true));
    let Reply::Sent { sent: all } = control.request(&send(None, "hello all", "k2")).await.unwrap() else { panic!() };
    assert_eq!(all.kind, MessageKind::Broadcast);
    let inbox = far.ok("read_new_messages", json!({})).await;
    let texts: Vec<&str> = inbox["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["hello far", "hello all"]);

    // where the pane's own message stands, and a message it may not see
    let ask = |id: &str| Request::MessageStatus { pane: "%5".into(), group: "team".into(), message_id: id.into() };
    let Reply::MessageStatus { status } = control.request(&ask(&dm.message_id)).await.unwrap() else { panic!() };
    assert_eq!(status.recipients.len(), 1);
    assert_eq!(status.recipients[0].peer.peer_id, far_id);
    let err = control.request(&ask("no-such-message")).await.unwrap();
    assert!(matches!(&err, Reply::Error { code: ErrorCode::Server, message } if message.contains("no-such-message")), "{err:?}");

    // bad input: an unknown recipient, a group the pane is not in, a pane not attached
    let err = control.request(&send(Some("nobody"), "x", "k3")).await.unwrap();
    assert!(matches!(&err, Reply::Error { code: ErrorCode::Server, message } if message.contains("nobody")), "{err:?}");
    let mut elsewhere = send(None, "x", "k4");
    if let Request::Send(req) = &mut elsewhere {
        req.group = "elsewhere".into();
    }
    let err = control.request(&elsewhere).await.unwrap();
    assert!(matches!(&err, Reply::Error { code: ErrorCode::NotAttached, message } if message.contains("elsewhere")), "{err:?}");
    let err = control.request(&Request::Peers { pane: "%99".into() }).await.unwrap();
    assert!(matches!(err, Reply::Error { code: ErrorCode::NotAttached, .. }), "{err:?}");
    daemon.stop().await;
    server.shutdown.cancel();
}

// (long: one outage scenario, step by step)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_for_a_server_that_hangs_or_is_away_hold_up_no_other_server() {
    let (here, away) = (server().await, server().await);
    let dir = tempfile::tempdir().unwrap();
    // a long reconnect maximum: a backoff shared by all servers would grow to seconds
    let daemon = start_daemon_with(Config { reconnect_max_secs: 60, ..daemon_config(dir.path(), &here.url) }).await;
    // per pane: the far sender, and two DMs to the pane
    let mut panes = Vec::new();
    for (pane, server) in [("%1", &here), ("%2", &away)] {
        let req = AttachRequest {
            pane: pane.into(),
            group: "team".into(),
            server: Some(server.url.clone()),
            working_directory: format!("/{pane}"),
            ..Default::default()
        };
        let Reply::Attached { attachment, .. } = daemon.client().await.request(&Request::Attach(req)).await.unwrap() else { panic!() };
        let (far, _) = mcp_peer(server, "team", "/far").await;
        let mut ids = Vec::new();
        for text in ["one", "two"] {
            let sent = far.ok("send_dm", json!({"to": attachment.peer_id, "message": text})).await;
            ids.push(sent["message_id"].as_str().unwrap().to_owned());
        }
        panes.push((attachment.peer_id, far, ids));
    }
    for (_, far, ids) in &panes {
        for id in ids {
            recipient_reaches(far, id, "delivered", Duration::from_secs(10)).await;
        }
    }
    // a pane in a second group on the same server: its stream is not the one that meets
    // the 401 in step 3
    let req = AttachRequest {
        pane: "%3".into(),
        group: "side".into(),
        server: Some(away.url.clone()),
        working_directory: "/side".into(),
        ..Default::default()
    };
    let Reply::Attached { attachment: side, .. } = daemon.client().await.request(&Request::Attach(req)).await.unwrap() else { panic!() };
    // a pane with a join key of its own, which relayd does not keep
    let req = AttachRequest {
        pane: "%4".into(),
        group: "locked".into(),
        server: Some(away.url.clone()),
        working_directory: "/locked".into(),
        join_key: Some("its own key".into()),
        ..Default::default()
    };
    assert!(matches!(daemon.client().await.request(&Request::Attach(req)).await.unwrap(), Reply::Attached { .. }));
    // the pane's sidebar, subscribed all along: it saw the away server's events up to here
    let mut sidebar = daemon.subscribe("%2", &[]).await;
    let mut control = daemon.client().await;
    let mut read = async |pane: &str, id: &str| {
        let receipts = vec![Receipt { message_id: id.into(), group: "team".into(), state: DeliveryState::Read, detail: None }];
        control.request(&Request::Report { pane: pane.into(), receipts }).await.unwrap();
    };
    let (here_far, here_ids) = (&panes[0].1, &panes[0].2);
    let (away_peer, away_ids) = (&panes[1].0, &panes[1].2);

    // 1. The server hangs: it takes connections and requests and never answers.
    away.shutdown.cancel();
    let addr: std::net::SocketAddr = away.url.trim_start_matches("http://").parse().unwrap();
    let hanging = bind_again(addr).await;
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = hanging.accept().await {
            held.push(tcp);
        }
    });
    read("%2", &away_ids[0]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    read("%1", &here_ids[0]).await;
    recipient_reaches(here_far, &here_ids[0], "read", Duration::from_millis(2500)).await;

    // 2. The server is away: connections are refused, again and again. A backoff shared by
    // all servers (0.25 + 0.5 + 1 + 2 + 4 s) would keep everything back until 7.75 s.
    held.abort();
    let _ = held.await; // the listener and the held connections close
    read("%2", &away_ids[1]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    read("%1", &here_ids[1]).await;
    recipient_reaches(here_far, &here_ids[1], "read", Duration::from_millis(2500)).await;

    // 3. The server comes back, having lost everything. Once relayd has registered its panes
    // again, a DM to either is pushed to it at once (both streams reopen without a wait,
    // from where the panes joined), and the receipt goes out at once, not when the backoff
    // that step 2 built up for the server (8 s and more by now) runs out.
    let back = server_on(bind_again(addr).await);
    // someone else made "locked" first on the new server, with another key: relayd cannot
    // register pane %4 again (it is told why in its log), and the other panes go on
    let other = relay_server::RegisterRequest {
        group_id: "locked".into(),
        hostname: "elsewhere".into(),
        working_directory: "/x".into(),
        join_key: Some("another key".into()),
        ..Default::default()
    };
    back.relay.register(None, other).unwrap();
    let (far, _) = mcp_peer(&back, "team", "/far").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let peers_now = loop {
        let Reply::Status { status } = control.request(&Request::Status).await.unwrap() else { panic!() };
        let peer_of = |pane: &str| status.attachments.iter().find(|a| a.pane == pane).map(|a| a.peer_id.clone()).unwrap();
        let (team_peer, side_peer) = (peer_of("%2"), peer_of("%3"));
        if team_peer != *away_peer && side_peer != side.peer_id {
            break [(far, team_peer), (mcp_peer(&back, "side", "/far").await.0, side_peer)];
        }
        assert!(std::time::Instant::now() < deadline, "relayd never registered again: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (far, pane_peer) in &peers_now {
        let sent = far.ok("send_dm", json!({"to": pane_peer, "message": "three"})).await;
        recipient_reaches(far, sent["message_id"].as_str().unwrap(), "delivered", Duration::from_millis(2500)).await;
    }
    // and the sidebar gets it though the new server numbers its events from 1 again
    let seen = events(&mut sidebar, WAIT).await;
    assert!(seen.iter().any(|(kind, preview, _)| kind == "dm" && preview == "three"), "{seen:?}");
    daemon.stop().await;
    here.shutdown.cancel();
    back.shutdown.cancel();
}

/// A listener on the address a stopped server used, once the port is free.
async fn bind_again(addr: std::net::SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..200 {
        if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the stopped server's port {addr} is still taken");
}

/// A TCP proxy that can go dead the way a NAT or a proxy does: the connections it carries
/// stay open, and nothing passes through them any more. New connections pass.
struct FreezingProxy {
    url: String,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    /// Connections numbered up to this pass nothing.
    frozen_up_to: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(to: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let to = to.trim_start_matches("http://").to_owned();
        let (frozen_up_to, frozen) = tokio::sync::watch::channel(0u64);
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn({
            let accepted = accepted.clone();
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else { return };
                    let number = accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let (to, mut frozen) = (to.clone(), frozen.clone());
                    tokio::spawn(async move {
                        let Ok(mut upstream) = tokio::net::TcpStream::connect(&to).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            // hold both ends open and pass nothing, until the test ends
                            _ = async { frozen.wait_for(|up_to| number <= *up_to).await.is_ok() } => std::future::pending::<()>().await,
                        }
                    });
                }
            }
        });
        FreezingProxy { url, accepted, frozen_up_to, task }
    }

    /// Every connection open now passes nothing from here on.
    fn freeze_open_connections(&self) {
        self.frozen_up_to.send_replace(self.accepted.load(std::sync::atomic::Ordering::SeqCst));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_gone_silent_is_reopened_and_status_says_why() {
    // a heartbeat every second: the stream counts as dead after three missed
    let server = serve_with(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        relay_server::Config { heartbeat_secs: 1, ..server_config() },
    );
    let proxy = FreezingProxy::start(&server.url).await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(dir.path(), &proxy.url).await;
    let me = daemon.attach("%1", "team", "/src/api").await;
    let mut sub = daemon.subscribe("%1", &[]).await;
    let (far, _) = mcp_peer(&server, "team", "/far").await;
    far.ok("send_dm", json!({"to": me.peer_id, "message": "before"})).await;
    let seen = events(&mut sub, WAIT).await;
    assert!(seen.iter().any(|(_, preview, _)| preview == "before"), "{seen:?}");

    // the path dies without a word: the connections relayd has are open and carry nothing
    proxy.freeze_open_connections();
    far.ok("send_dm", json!({"to": me.peer_id, "message": "after"})).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while !seen.iter().any(|(_, preview, _): &(String, String, u64)| preview == "after") {
        assert!(std::time::Instant::now() < deadline, "the silent stream was never reopened: {seen:?}");
        seen.extend(events(&mut sub, Duration::from_millis(200)).await);
    }
    let status = match daemon.client().await.request(&Request::Status).await.unwrap() {
        Reply::Status { status } => status,
        other => panic!("{other:?}"),
    };
    let upstream = &status.upstreams[0];
    assert_eq!(upstream.reopened, 1, "{upstream:?}");
    let why = upstream.last_drop.as_deref().unwrap_or_default();
    assert!(why.contains("no data for 3s") && why.contains("heartbeat every 1s"), "{why}");
    daemon.stop().await;
    proxy.task.abort();
    server.shutdown.cancel();
}
