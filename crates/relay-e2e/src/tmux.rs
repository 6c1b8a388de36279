//! A tmux server of the test's own (`tmux -L`), a stand-in agent to run in its panes, and
//! the `relay` CLI and `relay mcp` pointed at it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use relay_tmux::{RealTmux, Tmux};
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use rmcp::{RoleClient, ServiceExt, service::RunningService};

use crate::{binary, require};

/// A private tmux server, killed (and its socket removed) when dropped.
pub struct TmuxServer {
    pub tmux: RealTmux,
    pub socket: PathBuf,
    /// What `$TMUX` says inside it, for commands run "from" it.
    pub env: String,
    /// The environment it was started with, given to every new pane too.
    pane_env: Vec<(String, String)>,
}

impl TmuxServer {
    /// Starts one named after `name` and this process, or None (skip) without tmux.
    pub fn start(test: &str, name: &str) -> Option<Self> {
        Self::start_with_env(test, name, &[])
    }

    /// [`TmuxServer::start`] with `env` in the server's environment, which every pane
    /// started in it inherits (a machine of its own: its HOME, its runtime dir).
    pub fn start_with_env(test: &str, name: &str, env: &[(String, String)]) -> Option<Self> {
        let found = Command::new("tmux").arg("-V").output().ok().filter(|o| o.status.success()).map(|_| PathBuf::from("tmux"));
        require(test, "tmux", found)?;
        // unique per server, so tests running side by side never share one
        static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("relay-{name}-{}-{n}", std::process::id());
        let started = Command::new("tmux")
            .args(["-L", &name, "-f", "/dev/null", "new-session", "-d", "-s", "main", "-x", "220", "-y", "50", "sleep 3600"])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("TMUX")
            .output()
            .expect("run tmux");
        assert!(started.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&started.stderr));
        let tmux = RealTmux::named(&name);
        let socket = tmux.run(&["display-message", "-p", "#{socket_path}"]).expect("tmux display-message").trim().to_owned();
        Some(Self { tmux, env: format!("{socket},0,0"), socket: PathBuf::from(socket), pane_env: env.to_vec() })
    }

    /// A new window running `command` in `cwd`; returns its pane id.
    pub fn new_pane(&self, cwd: &str, command: &str) -> String {
        // tmux takes a new window's PATH from the client that asks for it, so the
        // environment this server was started with is set on the command itself
        let command = if self.pane_env.is_empty() {
            command.to_owned()
        } else {
            let vars: Vec<String> = self.pane_env.iter().map(|(k, v)| format!("{k}='{}'", v.replace('\'', "'\\''"))).collect();
            format!("export {}; {command}", vars.join(" "))
        };
        self.tmux.run(&["new-window", "-d", "-P", "-F", "#{pane_id}", "-c", cwd, &command]).expect("tmux new-window").trim().to_owned()
    }

    /// Runs the `relay` CLI as if from inside this tmux server, with relayd at `socket`.
    pub fn relay(&self, socket: &Path, args: &[&str], extra_env: &[(String, String)]) -> Output {
        Command::new(binary("relay"))
            .args(args)
            .env("TMUX", &self.env)
            .env("RELAYD_SOCKET", socket)
            .env_remove("TMUX_PANE")
            .envs(extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .output()
            .expect("run relay")
    }
}

impl Drop for TmuxServer {
    fn drop(&mut self) {
        // What runs in the panes (Claude Code writing its cache, say) outlives kill-server by
        // a moment: wait for it, so that a test's temp dir is removed after its last writer.
        let pane_pids = self.tmux.run(&["list-panes", "-a", "-F", "#{pane_pid}"]).unwrap_or_default();
        let processes = with_descendants(pane_pids.lines().filter_map(|p| p.trim().parse().ok()).collect());
        let _ = self.tmux.run(&["kill-server"]);
        let _ = std::fs::remove_file(&self.socket);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while processes.iter().any(|&pid| alive(pid)) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// `pids` and every process below them, from /proc (just `pids` where there is none).
fn with_descendants(mut pids: Vec<u32>) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            Some((pid, stat_field(pid, 1)?.parse().ok()?))
        })
        .collect();
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
        i += 1;
    }
    pids
}

/// Field `n` after the command name in `/proc/PID/stat` (0: state, 1: parent).
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name is in parentheses and may hold spaces
    stat.rsplit_once(')')?.1.split_whitespace().nth(n).map(str::to_owned)
}

/// Running, and not a zombie waiting for its parent.
fn alive(pid: u32) -> bool {
    stat_field(pid, 0).is_some_and(|state| state != "Z")
}

/// A stand-in agent named `claude` (so relay recognises it) that logs each line it reads;
/// run it as `python3 <path> <log file>`.
pub fn stand_in_agent(dir: &Path) -> PathBuf {
    let path = dir.join("claude");
    std::fs::write(&path, "import sys\nlog = open(sys.argv[1], 'a', buffering=1)\nfor line in sys.stdin:\n    log.write(line)\n")
        .expect("write the stand-in agent");
    path
}

/// `relay mcp --pane PANE` as a stdio MCP client session, the way an agent runs it.
pub async fn relay_mcp(socket: &Path, pane: &str) -> RunningService<RoleClient, ()> {
    let mut cmd = tokio::process::Command::new(binary("relay"));
    // the server comes from relayd; and not the Claude Code session these tests may run
    // in: relay mcp would report it
    cmd.args(["mcp", "--pane", pane])
        .env("RELAYD_SOCKET", socket)
        .env_remove("RELAY_SERVER")
        .env_remove("CLAUDE_CODE_MESSAGING_SOCKET")
        .env_remove("CLAUDE_CODE_SESSION_ID")
        .stderr(Stdio::null());
    ().serve(TokioChildProcess::new(cmd).expect("spawn relay mcp")).await.expect("relay mcp handshake")
}

/// Calls a tool through `client`; its structured result, or the tool's error text.
pub async fn call_tool(client: &RunningService<RoleClient, ()>, tool: &str, args: serde_json::Value) -> Result<serde_json::Value, String> {
    let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args.as_object().cloned().unwrap_or_default());
    let r = client.call_tool(params).await.map_err(|e| format!("{tool}: {e}"))?;
    if r.is_error == Some(true) {
        return Err(format!("{tool}: {:?}", r.content));
    }
    r.structured_content.ok_or_else(|| format!("{tool}: no structured content"))
}
