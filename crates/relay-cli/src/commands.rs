//! The small commands: status, peers, send, dm, history, console, service, completions.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use relay_proto::local::{ConsoleAction, Reply, Request, Status};
use serde_json::json;

use crate::bridge::call_as_pane;
use crate::cli::ConsoleArgs;
use crate::daemon::{self, sibling_binary};

pub async fn status(socket: &Path, as_json: bool) -> Result<()> {
    let mut client = relay_local::client::Client::connect(socket, daemon::CLIENT_NAME).await?;
    let Reply::Status { status } = daemon::request(&mut client, &Request::Status).await? else { bail!("unexpected reply") };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(())
}

pub fn render_status(s: &Status) -> String {
    let mut out = format!("relayd {} (pid {}) on {}; {} subscriber(s)\n", s.version, s.pid, s.socket, s.subscribers);
    if s.upstreams.is_empty() {
        out.push_str("no server connections (nothing attached)\n");
    }
    for u in &s.upstreams {
        let state = format!("{:?}", u.state).to_lowercase();
        let error = u.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
        out.push_str(&format!("  {} group {}: {state}{error}, last event {}, {} pane(s)\n", u.server, u.group, u.last_event_id, u.panes));
        if let Some(drop) = &u.last_drop {
            out.push_str(&format!("    reopened {} time(s); last ended {drop}\n", u.reopened));
        }
    }
    for a in &s.attachments {
        out.push_str(&format!("  {} in {} as {} ({}) at {}\n", a.pane, a.group, a.display_name, a.peer_id, a.working_directory));
    }
    for (pane, path) in &s.delivery {
        if let relay_proto::local::DeliveryPath::Keys { why } = path {
            out.push_str(&format!("  ⌨ {pane}: messages are typed into the pane, not posted to the agent's inbox: {why}\n"));
        }
    }
    for (pane, n) in &s.held {
        out.push_str(&format!(
            "  ⏸ {pane}: Claude Code holds {n} relay message(s) for your approval: approve them in the pane, or set \
             \"crossSessionInbound\": \"accept\" in Claude Code's settings.json to let relay messages in\n"
        ));
    }
    out
}

fn pane_or_env(pane: Option<String>) -> Result<String> {
    pane.context("which pane? run this inside the attached tmux pane or pass --pane %N")
}

pub async fn peers(socket: &Path, pane: Option<String>, as_json: bool) -> Result<()> {
    let out = call_as_pane(socket, &pane_or_env(pane)?, "list_peers", json!({})).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out["structured"])?);
    } else {
        print!("{}", out["text"].as_str().unwrap_or_default());
    }
    Ok(())
}

pub async fn send(socket: &Path, pane: Option<String>, group: Option<String>, text: String) -> Result<()> {
    let out = call_as_pane(socket, &pane_or_env(pane)?, "send_message", json!({"message": text, "group_id": group})).await?;
    println!("{}", out["text"].as_str().unwrap_or_default());
    Ok(())
}

pub async fn dm(socket: &Path, pane: Option<String>, peer: String, text: String) -> Result<()> {
    let out = call_as_pane(socket, &pane_or_env(pane)?, "send_dm", json!({"to": peer, "message": text})).await?;
    println!("{}", out["text"].as_str().unwrap_or_default());
    Ok(())
}

pub async fn history(socket: &Path, pane: Option<String>, group: Option<String>, limit: usize) -> Result<()> {
    let out = call_as_pane(socket, &pane_or_env(pane)?, "get_history", json!({"group_id": group, "limit": limit})).await?;
    print!("{}", out["text"].as_str().unwrap_or_default());
    Ok(())
}

/// `relay console`: asks relayd for a sign-in link (or a pairing, or a sign-out) and opens
/// the link in a browser, or prints it where there is none.
pub async fn console(socket: &Path, args: ConsoleArgs) -> Result<()> {
    // the name a new human gets (a link or a pairing may be the first thing asked)
    let name = args.name.or_else(|| std::env::var("USER").ok()).filter(|n| !n.trim().is_empty());
    let action = if args.sign_out_everywhere {
        ConsoleAction::SignOutEverywhere
    } else if args.pair {
        ConsoleAction::Pair { name }
    } else if let Some(code) = args.pair_with {
        ConsoleAction::Join { code }
    } else {
        ConsoleAction::SignIn { name }
    };
    let mut client = daemon::connect_or_start(socket).await?;
    let request = Request::Console { server: args.server, action: action.clone() };
    let Reply::Console { server, human, url, code, expires_at } = daemon::request(&mut client, &request).await? else {
        bail!("unexpected reply from relayd")
    };
    let until = expires_at.map(|t| t.format("%H:%M UTC").to_string()).unwrap_or_default();
    match action {
        ConsoleAction::SignOutEverywhere => println!("Every console session of {human} on {server} has ended."),
        ConsoleAction::Pair { .. } => {
            let code = code.context("the server sent no code")?;
            println!(
                "On your other machine, run:\n\n    relay console --server {server} --pair-with {code}\n\n(works once, until {until})"
            );
        }
        ConsoleAction::Join { .. } => println!("This machine's agents on {server} now show in {human}'s console."),
        ConsoleAction::SignIn { .. } => {
            let url = url.context("the server sent no link")?;
            let opened = !args.no_open && open_browser(&url);
            if opened {
                println!("Opened the console for {human} in your browser (the link works once, until {until}).");
            } else {
                println!("Sign in to the console as {human} (works once, until {until}):\n\n    {url}");
            }
        }
    }
    Ok(())
}

/// Opens `url` in the desktop's browser; false where there is none (a server over SSH).
fn open_browser(url: &str) -> bool {
    let headless = cfg!(target_os = "linux") && std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none();
    if headless {
        return false;
    }
    let opener = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
    std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const SYSTEMD_UNIT: &str = include_str!("../../../systemd/relayd.service");
const LAUNCHD_PLIST: &str = include_str!("../../../launchd/com.relay.relayd.plist");

/// Where the service file goes, and its text with this installation's relayd path.
pub fn service_file(home: &Path, relayd: &Path) -> Result<(PathBuf, String)> {
    Ok(if cfg!(target_os = "macos") {
        (home.join("Library/LaunchAgents/com.relay.relayd.plist"), launchd_plist(relayd))
    } else {
        (home.join(".config/systemd/user/relayd.service"), systemd_unit(relayd)?)
    })
}

/// The systemd unit running `relayd`, quoted for systemd's command line with `%` doubled so
/// systemd does not read it as a specifier. systemd runs no program whose path holds a
/// quote or a backslash.
pub fn systemd_unit(relayd: &Path) -> Result<String> {
    let path = relayd.display().to_string();
    if path.chars().any(|c| matches!(c, '"' | '\'' | '\\') || c.is_control()) {
        anyhow::bail!(
            "systemd cannot run a program whose path holds quotes, backslashes or control characters ({path}); install relayd elsewhere"
        );
    }
    let quoted = path.replace('%', "%%");
    Ok(SYSTEMD_UNIT.replace("ExecStart=%h/.cargo/bin/relayd", &format!("ExecStart=\"{quoted}\"")))
}

/// The launchd agent running `relayd`: the path goes into a double-quoted word of a
/// `sh -c` script, which goes into XML, so it is escaped for both.
pub fn launchd_plist(relayd: &Path) -> String {
    let mut shell = String::new();
    for c in relayd.display().to_string().chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            shell.push('\\');
        }
        shell.push(c);
    }
    let xml = shell.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    LAUNCHD_PLIST.replace("\"$HOME/.cargo/bin/relayd\"", &format!("\"{xml}\""))
}

pub fn service(install: bool) -> Result<()> {
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let relayd = std::fs::canonicalize(sibling_binary("relayd")).unwrap_or_else(|_| sibling_binary("relayd"));
    let (path, text) = service_file(&home, &relayd)?;
    let macos = cfg!(target_os = "macos");
    if install {
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        relay_util::write_atomically(&path, text.as_bytes(), 0o644)?;
        println!("Installed {}", path.display());
        if macos {
            println!("Next: launchctl bootstrap gui/$(id -u) {}", path.display());
        } else {
            let _ = std::process::Command::new("systemctl").args(["--user", "daemon-reload"]).status();
            println!("Next: systemctl --user enable --now relayd");
        }
    } else {
        if macos {
            println!("First: launchctl bootout gui/$(id -u)/com.relay.relayd");
        } else {
            let _ = std::process::Command::new("systemctl").args(["--user", "disable", "--now", "relayd"]).status();
        }
        match std::fs::remove_file(&path) {
            Ok(()) => println!("Removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("Nothing installed at {}", path.display()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_file_runs_this_relayd() {
        let (path, text) = service_file(Path::new("/home/me"), Path::new("/opt/relay/bin/relayd")).unwrap();
        if cfg!(target_os = "macos") {
            assert!(path.ends_with("Library/LaunchAgents/com.relay.relayd.plist"));
            assert!(text.contains("\"/opt/relay/bin/relayd\"") && text.contains("<key>KeepAlive</key>"));
        } else {
            assert_eq!(path, Path::new("/home/me/.config/systemd/user/relayd.service"));
            assert!(text.contains("ExecStart=\"/opt/relay/bin/relayd\"\n"), "{text}");
            assert!(text.contains("Restart=on-failure") && text.contains("WantedBy=default.target"));
        }
    }

    #[test]
    fn status_reads_well() {
        let status = Status {
            version: "0.1.0".into(),
            pid: 7,
            socket: "/run/s".into(),
            server: "http://s".into(),
            attachments: vec![relay_proto::local::Attachment {
                pane: "%3".into(),
                server: "http://s".into(),
                group: "g".into(),
                peer_id: "p_1".into(),
                display_name: "box:api".into(),
                working_directory: "/w".into(),
            }],
            upstreams: vec![relay_proto::local::Upstream {
                server: "http://s".into(),
                group: "g".into(),
                state: relay_proto::local::ConnectionState::Retrying,
                last_event_id: 4,
                panes: 1,
                error: Some("connection refused".into()),
                reopened: 2,
                last_drop: Some("2026-12-06 00:12:03 UTC: no data for 45s".into()),
            }],
            subscribers: 1,
            held: [("%3".to_owned(), 2)].into(),
            delivery: [
                ("%3".to_owned(), relay_proto::local::DeliveryPath::Inbox),
                ("%4".to_owned(), relay_proto::local::DeliveryPath::Keys { why: "the agent is not Claude Code".into() }),
            ]
            .into(),
        };
        let text = render_status(&status);
        assert!(text.contains("⏸ %3: Claude Code holds 2 relay message(s)") && text.contains("crossSessionInbound"), "{text}");
        assert!(text.contains("http://s group g: retrying (connection refused), last event 4, 1 pane(s)"), "{text}");
        assert!(text.contains("%3 in g as box:api (p_1) at /w"), "{text}");
        assert!(text.contains("⌨ %4: messages are typed into the pane, not posted to the agent's inbox: the agent is not Claude Code"));
        assert!(!text.contains("⌨ %3"), "{text}");
        assert!(text.contains("reopened 2 time(s); last ended 2026-12-06 00:12:03 UTC: no data for 45s"), "{text}");
    }
}
