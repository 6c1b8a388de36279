//! Claude Code's inbox: posting a notice into a session's socket, and the reply sockets on
//! which Claude Code answers: receipts for held messages, and the agent's own `SendMessage`.
//!
//! Claude Code only parses the wrapper in its canonical form (attributes in a fixed order,
//! the body on lines of its own), only echoes a `msg_id` that is a UUID, and only writes a
//! receipt to a socket in its own socket directory that belongs to the process that posted.
//! So relay-pane binds its reply sockets beside the session's socket, and posts itself.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::notice::{Notice, ReplyTarget};

/// Longest line read from a reply socket.
const MAX_LINE: u64 = 256 * 1024;
/// How long a connection may take to deliver its line (Claude Code's own limit is 30 s).
const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// `<cross-session-message from="uds:…" from-name="…">\nBODY\n</cross-session-message>`,
/// exactly as Claude Code rebuilds it. relay claims no permission mode (`from-mode`).
pub fn wrap(from: &Path, from_name: &str, body: &str) -> String {
    format!("<cross-session-message from=\"uds:{}\" from-name=\"{from_name}\">\n{body}\n</cross-session-message>", from.display())
}

/// The JSON line that posts `notice` into an inbox, replies going to `from`.
pub fn line(notice: &Notice, from: &Path, msg_id: &str) -> String {
    let content = wrap(from, &notice.target.display_name(), &notice.content);
    let mut line = json!({
        "type": "user",
        "message": {"role": "user", "content": content},
        "from": format!("uds:{}", from.display()),
        "priority": "next",
        "msg_id": msg_id,
    })
    .to_string();
    line.push('\n');
    line
}

/// Writes one line into the inbox at `socket` and waits (briefly) for Claude Code to close
/// the connection, which it does once it has taken the line.
pub async fn post(socket: &Path, line: &str) -> io::Result<()> {
    let attempt = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(line.as_bytes()).await?;
        stream.shutdown().await?;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest)).await;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the inbox did not take the line in 5 s")))
}

/// What arrives on a reply socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// What became of a posted message: held, delivered (a held one was let in), denied,
    /// expired, dropped.
    Status { orig_msg_id: Option<String>, status: String, detail: Option<String>, reason: Option<String> },
    /// The agent answered with its own `SendMessage`.
    Reply { text: String, from: Option<String> },
}

pub fn parse(line: &str) -> Option<Inbound> {
    let v: Value = serde_json::from_str(line).ok()?;
    let text = |k: &str| v[k].as_str().map(str::to_owned);
    match (v["type"].as_str()?, v["action"].as_str()) {
        ("control", Some("peer_message_status")) => Some(Inbound::Status {
            orig_msg_id: text("orig_msg_id"),
            status: text("status")?,
            detail: text("status_detail").or_else(|| text("drop_reason")),
            reason: text("reason"),
        }),
        ("user", _) => {
            let content = match &v["message"]["content"] {
                Value::String(s) => s.clone(),
                // content blocks: the text ones, joined
                Value::Array(blocks) => blocks.iter().filter_map(|b| b["text"].as_str()).collect::<Vec<_>>().join("\n"),
                _ => return None,
            };
            Some(Inbound::Reply { text: unwrap(&content).to_owned(), from: text("from") })
        }
        _ => None,
    }
}

/// The body of a `<cross-session-message …>` wrapper, or the text as it is.
pub fn unwrap(content: &str) -> &str {
    let trimmed = content.trim();
    let Some(rest) = trimmed.strip_prefix("<cross-session-message") else { return trimmed };
    let Some(open_end) = rest.find('>') else { return trimmed };
    let body = &rest[open_end + 1..];
    body.strip_suffix("</cross-session-message>").unwrap_or(body).trim_matches('\n')
}

/// One reply socket: for one pane and one conversation (a DM peer, or a group).
pub struct ReplySocket {
    pub path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReplySocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a reply socket heard, from which process.
#[derive(Debug)]
pub struct Heard {
    pub target: ReplyTarget,
    pub inbound: Inbound,
    /// The writer's pid and uid, from the socket's peer credentials.
    pub peer_pid: Option<i32>,
    pub peer_uid: u32,
}

/// The path of the reply socket for `target`, beside the session's own socket (the only
/// place Claude Code sends receipts to).
pub fn reply_path(session_socket: &Path, pane: &str, target: &ReplyTarget) -> PathBuf {
    let dir = session_socket.parent().unwrap_or(Path::new("/tmp"));
    dir.join(format!("relay-{}-{}.sock", pane.trim_start_matches('%'), target.key()))
}

/// Binds `path` (0600), replacing a stale socket, and hands what it hears to `tx`.
pub fn listen(path: PathBuf, target: ReplyTarget, tx: mpsc::Sender<Heard>) -> io::Result<ReplySocket> {
    if path.exists() && std::os::unix::net::UnixStream::connect(&path).is_err() {
        std::fs::remove_file(&path)?; // left by a relay-pane that died
    }
    let listener = UnixListener::bind(&path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // out of descriptors, say: wait instead of spinning
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(read_one(stream, target.clone(), tx.clone()));
        }
    });
    Ok(ReplySocket { path, task })
}

/// Reads the line a connection carries, then closes it: closing is how the writer (Claude
/// Code's `SendMessage`) learns the line was taken.
async fn read_one(stream: UnixStream, target: ReplyTarget, tx: mpsc::Sender<Heard>) {
    let (peer_pid, peer_uid) = match stream.peer_cred() {
        Ok(cred) => (cred.pid(), cred.uid()),
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream).take(MAX_LINE);
    let mut line = String::new();
    let read = tokio::time::timeout(LINE_TIMEOUT, reader.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return;
    }
    match parse(&line) {
        Some(inbound) => {
            let _ = tx.send(Heard { target, inbound, peer_pid, peer_uid }).await;
        }
        None => tracing::debug!(line = %line.trim_end(), "a reply socket got a line it does not know"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dm_target() -> ReplyTarget {
        ReplyTarget::Dm { group: "team".into(), peer_id: "p_1".into(), name: "alice".into() }
    }

    #[test]
    fn the_line_has_the_canonical_wrapper_and_a_uuid() {
        let notice = Notice { target: dm_target(), content: "hello".into(), carried: vec![], mentioned: vec![] };
        let from = Path::new("/run/user/1000/cc-socks/relay-3-abc.sock");
        let line = line(&notice, from, "11111111-2222-4333-8444-555555555555");
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "user");
        assert_eq!(v["priority"], "next");
        assert_eq!(v["from"], "uds:/run/user/1000/cc-socks/relay-3-abc.sock");
        assert_eq!(v["msg_id"], "11111111-2222-4333-8444-555555555555");
        assert_eq!(
            v["message"]["content"],
            "<cross-session-message from=\"uds:/run/user/1000/cc-socks/relay-3-abc.sock\" from-name=\"alice@team\">\nhello\n</cross-session-message>"
        );
        assert!(!line.contains("from-mode"), "relay never claims a permission mode");
    }

    #[test]
    fn parses_receipts_and_replies() {
        let held = r#"{"type":"control","action":"peer_message_status","status":"held","reason":"Your message is held","from":"uds:/tmp/cc-socks/1.sock","orig_msg_id":"u-1","msgV":1,"msg_id":"u-2"}"#;
        assert_eq!(
            parse(held),
            Some(Inbound::Status {
                orig_msg_id: Some("u-1".into()),
                status: "held".into(),
                detail: None,
                reason: Some("Your message is held".into())
            })
        );
        let refused = r#"{"type":"control","action":"peer_message_status","status":"expired","status_detail":"refused"}"#;
        assert!(matches!(parse(refused), Some(Inbound::Status { detail: Some(d), .. }) if d == "refused"));
        let reply = r#"{"msgV":1,"msg_id":"x","type":"user","message":{"role":"user","content":"<cross-session-message from=\"uds:/tmp/cc-socks/9.sock\" hop-chain=\"b0\" from-name=\"proj-49\" from-mode=\"prompting\">\nhi back\nfrom bob\n</cross-session-message>"},"priority":"next","from":"uds:/tmp/cc-socks/9.sock"}"#;
        assert_eq!(parse(reply), Some(Inbound::Reply { text: "hi back\nfrom bob".into(), from: Some("uds:/tmp/cc-socks/9.sock".into()) }));
        for junk in ["", "not json", "{}", r#"{"type":"control","action":"other"}"#, r#"{"type":"user","message":{}}"#] {
            assert_eq!(parse(junk), None, "{junk}");
        }
        assert_eq!(unwrap("plain text"), "plain text");
    }

    #[test]
    fn reply_sockets_sit_beside_the_session_socket_with_stable_names() {
        let a = reply_path(Path::new("/tmp/cc-socks/42.sock"), "%3", &dm_target());
        assert_eq!(a, reply_path(Path::new("/tmp/cc-socks/42.sock"), "%3", &dm_target()));
        assert!(a.starts_with("/tmp/cc-socks/") && a.to_str().unwrap().ends_with(".sock"));
        let group = reply_path(Path::new("/tmp/cc-socks/42.sock"), "%3", &ReplyTarget::Group { group: "team".into() });
        assert_ne!(a, group);
    }

    #[tokio::test]
    async fn a_reply_socket_hears_one_line_per_connection_then_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay-3-x.sock");
        let (tx, mut rx) = mpsc::channel(4);
        let socket = listen(path.clone(), dm_target(), tx).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        let mut writer = UnixStream::connect(&path).await.unwrap();
        writer.write_all(b"{\"type\":\"user\",\"message\":{\"role\":\"user\",\"content\":\"ok\"}}\n").await.unwrap();
        // the writer half-closes and waits for us to close, as SendMessage does
        writer.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), writer.read_to_end(&mut rest)).await.expect("closed by the listener").unwrap();
        let heard = rx.recv().await.unwrap();
        assert_eq!(heard.inbound, Inbound::Reply { text: "ok".into(), from: None });
        assert_eq!(heard.peer_pid, Some(std::process::id() as i32));
        assert_eq!(heard.target, dm_target());

        drop(socket);
        assert!(!path.exists(), "the socket file goes with it");
    }

    #[tokio::test]
    async fn post_writes_the_line_and_waits_for_the_inbox_to_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.sock");
        let inbox = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = inbox.accept().await.unwrap();
            let mut line = String::new();
            BufReader::new(stream).read_line(&mut line).await.unwrap();
            line
        });
        post(&path, "{\"type\":\"user\"}\n").await.unwrap();
        assert_eq!(server.await.unwrap(), "{\"type\":\"user\"}\n");
        let missing = post(&dir.path().join("gone.sock"), "x\n").await.unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
