//! Claude Code's sessions: finding the one in a tmux pane, and knowing whether it is still
//! there.
//!
//! Claude Code keeps a registry, `~/.claude/sessions/<pid>.json`, with the session's inbox
//! socket (`messagingSocketPath`), its tmux pane (`tmux`: `"work:@0.%3"`), its `status`
//! (idle, busy, waiting) and the process start time (`procStart`, field 22 of
//! `/proc/<pid>/stat`), so a reused pid is not taken for the session. A crash leaves the
//! file and the socket behind; a live pid with the same start time tells them apart.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One Claude Code session, as far as relay needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub pid: u32,
    pub socket: PathBuf,
    pub session_id: Option<String>,
    pub proc_start: Option<String>,
    /// idle, busy or waiting (a permission or held-message dialog is open).
    pub status: Option<String>,
    pub cwd: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistryEntry {
    pid: Option<u32>,
    session_id: Option<String>,
    cwd: Option<PathBuf>,
    proc_start: Option<String>,
    tmux: Option<String>,
    messaging_socket_path: Option<PathBuf>,
    status: Option<String>,
}

/// Claude Code's configuration directory in our environment: `$CLAUDE_CONFIG_DIR`, else
/// `~/.claude`.
pub fn claude_dir() -> Option<PathBuf> {
    AgentEnv { config_dir: std::env::var_os("CLAUDE_CONFIG_DIR"), home: std::env::var_os("HOME") }.claude_dir()
}

/// What of an agent's environment decides where its Claude Code keeps its sessions and
/// settings. People run Claude Code with a `CLAUDE_CONFIG_DIR` (or a `HOME`) of its own,
/// which the sidebar, started by tmux, and `relay attach`, run from another shell, do not share.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentEnv {
    pub config_dir: Option<std::ffi::OsString>,
    pub home: Option<std::ffi::OsString>,
}

impl AgentEnv {
    /// The running process's environment (Linux: `/proc/<pid>/environ`, readable for our
    /// own processes); None where it cannot be read.
    pub fn of(pid: u32) -> Option<Self> {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let mut env = Self::default();
        for var in environ.split(|b| *b == 0) {
            let value = |prefix: &[u8]| var.strip_prefix(prefix).filter(|v| !v.is_empty()).map(os_string);
            if let Some(dir) = value(b"CLAUDE_CONFIG_DIR=") {
                env.config_dir = Some(dir);
            } else if let Some(home) = value(b"HOME=") {
                env.home = Some(home);
            }
        }
        Some(env)
    }

    /// `CLAUDE_CONFIG_DIR`, else `HOME/.claude`.
    pub fn claude_dir(&self) -> Option<PathBuf> {
        self.config_dir.as_ref().map(PathBuf::from).or_else(|| self.home.as_ref().map(|h| PathBuf::from(h).join(".claude")))
    }

    /// Sets this environment on a `claude` command, so it reads and writes the agent's configuration.
    pub fn apply(&self, command: &mut std::process::Command) {
        if let Some(dir) = &self.config_dir {
            command.env("CLAUDE_CONFIG_DIR", dir);
        }
        if let Some(home) = &self.home {
            command.env("HOME", home);
        }
    }
}

fn os_string(bytes: &[u8]) -> std::ffi::OsString {
    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(bytes).to_owned()
}

/// The permission rule that lets every relay MCP tool run without a prompt.
pub const RELAY_TOOLS_RULE: &str = "mcp__relay";

/// Adds [`RELAY_TOOLS_RULE`] to `permissions.allow` in `settings.json`, keeping everything
/// else in it. Returns false if it was there already.
pub fn allow_relay_tools(settings: &Path) -> std::io::Result<bool> {
    let mut value: serde_json::Value = match std::fs::read_to_string(settings) {
        Ok(text) if !text.trim().is_empty() => serde_json::from_str(&text).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is not valid JSON ({e}); left it alone", settings.display()))
        })?,
        Ok(_) => serde_json::json!({}),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e),
    };
    let bad_shape =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: permissions.allow is not a list", settings.display()));
    let root = value.as_object_mut().ok_or_else(bad_shape)?;
    let permissions = root.entry("permissions").or_insert_with(|| serde_json::json!({})).as_object_mut().ok_or_else(bad_shape)?;
    let allow = permissions.entry("allow").or_insert_with(|| serde_json::json!([])).as_array_mut().ok_or_else(bad_shape)?;
    if allow.iter().any(|r| r == RELAY_TOOLS_RULE) {
        return Ok(false);
    }
    allow.push(RELAY_TOOLS_RULE.into());
    if let Some(dir) = settings.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&value).expect("JSON values serialize") + "\n";
    relay_util::write_atomically(settings, text.as_bytes(), 0o600)?;
    Ok(true)
}

/// The live session whose registry entry names `pane`; the most recently started one if
/// several claim it (a crashed one left its file behind).
pub fn find(claude_dir: &Path, pane: &str) -> Option<Session> {
    let entries = std::fs::read_dir(claude_dir.join("sessions")).ok()?;
    let mut found: Vec<(std::time::SystemTime, Session)> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(session) = read_entry(&path).filter(|(tmux, _)| pane_of(tmux) == Some(pane)).map(|(_, s)| s) else { continue };
        if is_alive(&session) {
            let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            found.push((modified, session));
        }
    }
    found.into_iter().max_by_key(|(modified, _)| *modified).map(|(_, s)| s)
}

/// The session registered under `pid` (as `relay mcp` reports its parent), if alive.
pub fn by_pid(claude_dir: &Path, pid: u32) -> Option<Session> {
    read_entry(&claude_dir.join("sessions").join(format!("{pid}.json"))).map(|(_, s)| s).filter(is_alive)
}

fn read_entry(path: &Path) -> Option<(String, Session)> {
    let text = std::fs::read_to_string(path).ok()?;
    let e: RegistryEntry = serde_json::from_str(&text).ok()?;
    let pid = e.pid.or_else(|| path.file_stem()?.to_str()?.parse().ok())?;
    let session =
        Session { pid, socket: e.messaging_socket_path?, session_id: e.session_id, proc_start: e.proc_start, status: e.status, cwd: e.cwd };
    Some((e.tmux.unwrap_or_default(), session))
}

/// `%3` from `"work:@0.%3"`.
fn pane_of(tmux: &str) -> Option<&str> {
    tmux.rsplit_once('.').map(|(_, pane)| pane).filter(|p| p.starts_with('%'))
}

/// The pid runs, and (when the registry says) it is the same process that registered.
pub fn is_alive(session: &Session) -> bool {
    // 0 and values past i32 would name process groups to kill(2), not a process
    if session.pid == 0 || i32::try_from(session.pid).is_err() {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", session.pid)) else {
        // no procfs (macOS): ask the kernel whether the pid exists
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        return unsafe { libc::kill(session.pid as libc::pid_t, 0) } == 0;
    };
    match &session.proc_start {
        Some(start) => proc_start(&stat).is_some_and(|s| s == start),
        None => true,
    }
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock ticks after boot.
pub fn proc_start(stat: &str) -> Option<&str> {
    // fields after the parenthesised command name (which may hold spaces) start at 3
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)
}

/// The session's transcript, `<claude dir>/projects/<escaped cwd>/<session id>.jsonl`,
/// found by the session id so the escaping rule does not matter.
pub fn transcript(claude_dir: &Path, session: &Session) -> Option<PathBuf> {
    let id = session.session_id.as_deref()?;
    let file = format!("{id}.jsonl");
    std::fs::read_dir(claude_dir.join("projects")).ok()?.flatten().map(|d| d.path().join(&file)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_entry(dir: &Path, pid: u32, tmux: &str, proc_start: Option<&str>) {
        let sessions = dir.join("sessions");
        std::fs::create_dir_all(&sessions).unwrap();
        let entry = serde_json::json!({
            "pid": pid, "sessionId": format!("s-{pid}"), "cwd": "/w", "procStart": proc_start,
            "tmux": tmux, "messagingSocketPath": format!("/tmp/cc-socks/{pid}.sock"), "status": "idle",
            "peerProtocol": 1, "name": "w-1"
        });
        std::fs::write(sessions.join(format!("{pid}.json")), entry.to_string()).unwrap();
    }

    fn own_start() -> String {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", std::process::id())).unwrap();
        proc_start(&stat).unwrap().to_owned()
    }

    #[test]
    fn finds_the_live_session_of_a_pane() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        write_entry(dir.path(), me, "work:@0.%3", Some(&own_start()));
        write_entry(dir.path(), me, "work:@0.%3", Some(&own_start()));
        let found = find(dir.path(), "%3").unwrap();
        assert_eq!((found.pid, found.socket.clone()), (me, PathBuf::from(format!("/tmp/cc-socks/{me}.sock"))));
        assert_eq!(found.status.as_deref(), Some("idle"));
        assert_eq!(by_pid(dir.path(), me), Some(found));
        assert_eq!(find(dir.path(), "%30"), None, "%30 is not %3");
        assert_eq!(find(dir.path(), "%4"), None);
    }

    #[test]
    fn a_crashed_session_or_a_reused_pid_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        // a pid that does not run (beyond pid_max)
        write_entry(dir.path(), 999_999_999, "work:@0.%5", None);
        assert_eq!(find(dir.path(), "%5"), None);
        // our pid, but started at another time: the pid was reused
        write_entry(dir.path(), std::process::id(), "work:@0.%5", Some("1"));
        assert_eq!(find(dir.path(), "%5"), None);
        // no registry at all
        assert_eq!(find(&dir.path().join("nowhere"), "%5"), None);
    }

    #[test]
    fn allowing_relay_tools_keeps_the_rest_of_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let settings = dir.path().join("sub/settings.json");
        assert!(allow_relay_tools(&settings).unwrap(), "created");
        std::fs::write(&settings, r#"{"theme":"dark","permissions":{"allow":["Bash(ls:*)"],"defaultMode":"default"}}"#).unwrap();
        assert!(allow_relay_tools(&settings).unwrap());
        assert!(!allow_relay_tools(&settings).unwrap(), "once is enough");
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
        assert_eq!(v["permissions"]["allow"], serde_json::json!(["Bash(ls:*)", "mcp__relay"]));
        assert_eq!((v["theme"].as_str(), v["permissions"]["defaultMode"].as_str()), (Some("dark"), Some("default")));
        std::fs::write(&settings, "{ not json").unwrap();
        let err = allow_relay_tools(&settings).unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
        assert_eq!(std::fs::read_to_string(&settings).unwrap(), "{ not json", "a broken file is left alone");
    }

    #[test]
    fn an_agents_config_dir_comes_from_its_own_environment() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("CLAUDE_CONFIG_DIR", "/home/me/.claude-work")
            .env("HOME", "/home/me")
            .spawn()
            .unwrap();
        // Right after exec the kernel may not have laid out the new environment yet
        // (`/proc/PID/environ` reads empty for a moment), so wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let env = loop {
            let env = AgentEnv::of(child.id());
            if env.as_ref().is_some_and(|e| e.home.is_some()) || std::time::Instant::now() > deadline {
                break env;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let _ = child.kill();
        let _ = child.wait();
        let env = env.expect("our child's environment is readable");
        assert_eq!(env.claude_dir(), Some(PathBuf::from("/home/me/.claude-work")));
        let home_only = AgentEnv { config_dir: None, home: env.home.clone() };
        assert_eq!(home_only.claude_dir(), Some(PathBuf::from("/home/me/.claude")));
        assert_eq!(AgentEnv::of(999_999_999), None);
    }

    #[test]
    fn reads_the_start_time_past_a_command_name_with_spaces() {
        let stat = "42 (tmux: server) S 1 42 42 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 987654 100 200";
        assert_eq!(proc_start(stat), Some("987654"));
    }
}
