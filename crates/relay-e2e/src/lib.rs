//! Helpers for the end-to-end tests: the real binaries as child processes, and the
//! external tools some tests drive, and the clients (MCP, SSE) tests talk through.

pub mod claude;
pub mod desktop;
pub mod mcp;
pub mod nats;
pub mod proxy;
pub mod sse;
pub mod tmux;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A binary of this workspace beside the running one: a test's (`target/<profile>/deps/`)
/// or a binary's own (`target/<profile>/`). `tests/run` builds them before the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dirs = exe.ancestors().skip(1).take(2);
    let candidates: Vec<PathBuf> = dirs.map(|d| d.join(name)).collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| panic!("{} is missing: build the workspace's binaries first (tests/run does)", candidates[0].display()))
}

/// Whether a test that needs an external tool should run. Outside CI a missing tool skips
/// the test, saying so by name; under CI=true it fails the test.
pub fn require(test: &str, what: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_some() {
        return found;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("{test}: {what} is required under CI but was not found (tests/run installs it)");
    }
    eprintln!("SKIPPED: {test} ({what} not available; run tests/run to set it up)");
    None
}

/// The venv Python with the official MCP SDK that `tests/run` prepared.
pub fn python_with_mcp(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("RELAY_TEST_PYTHON").map(PathBuf::from).filter(|p| p.exists());
    require(test, "python with the MCP SDK (RELAY_TEST_PYTHON)", found)
}

/// The Claude Code CLI that `tests/run` installed from npm.
pub fn claude_code(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("RELAY_TEST_CLAUDE").map(PathBuf::from).filter(|p| p.exists());
    require(test, "the Claude Code CLI (RELAY_TEST_CLAUDE)", found)
}

/// Chromium for the console's browser tests, with Playwright beside it in the venv
/// (`tests/run` sets `RELAY_TEST_CHROMIUM` when both are there).
pub fn chromium(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("RELAY_TEST_CHROMIUM").map(PathBuf::from).filter(|p| p.exists());
    require(test, "chromium and Playwright (RELAY_TEST_CHROMIUM)", found)
}

/// Set to 1, these keep Claude Code off the network and quiet (no telemetry, updates,
/// error reports or marketplace installs).
pub const CLAUDE_QUIET_ENV: [&str; 5] = [
    "DISABLE_TELEMETRY",
    "DISABLE_AUTOUPDATER",
    "DISABLE_ERROR_REPORTING",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
    "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL",
];

/// A command running Claude Code offline and quietly, in a private HOME.
pub fn claude_command(bin: &Path, home: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear().env("HOME", home).env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd.envs(CLAUDE_QUIET_ENV.map(|name| (name, "1"))).current_dir(home).stdin(Stdio::null());
    cmd
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (by its PID) when this goes out of scope, panics included.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn kill_hard(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Starts the real `relayd` with its socket and state under `dir`, for `server`; returns the
/// child and the socket path. `extra_env` goes to its environment; its stderr to `stderr`.
pub fn spawn_relayd(dir: &Path, server: &str, args: &[&str], extra_env: &[(&str, &str)], stderr: Stdio) -> (KillOnDrop, PathBuf) {
    let socket = dir.join("run/relayd.sock");
    let child = Command::new(binary("relayd"))
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--server", server])
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("RELAY_CONFIG")
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn relayd");
    (KillOnDrop(child), socket)
}

/// A `relay-server` child process. Killed (SIGKILL) when dropped.
pub struct ServerProcess {
    pub child: KillOnDrop,
    pub addr: SocketAddr,
    pub stderr: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `relay-server --listen 127.0.0.1:PORT` (0 picks a port) with `args`, and
    /// waits until it answers /healthz.
    pub fn start(port: u16, args: &[&str]) -> Self {
        let mut child = Command::new(binary("relay-server"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .env("RUST_LOG", "info,rmcp=warn")
            .env_remove("RELAY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn relay-server");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        // from here on a failed start still stops the child
        let child = KillOnDrop(child);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The server logs the address it bound; that is how a port of 0 becomes known. A
        // cluster node binds once it reaches NATS, which it tries for a minute (longer when
        // the suite's other clusters load both cores): so wait past that.
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut said = Vec::new();
        let addr = loop {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            let line = line.unwrap_or_else(|_| panic!("relay-server did not report its address; it said:\n{}", said.join("\n")));
            if let Some(addr) = line.split("addr=").nth(1).and_then(|rest| rest.split_whitespace().next())
                && let Ok(addr) = addr.parse()
            {
                break addr;
            }
            said.push(line);
        };
        let server = Self { child, addr, stderr: rx };
        server.wait_healthy();
        server
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(self.addr).is_err() {
            assert!(Instant::now() < deadline, "relay-server at {} never accepted connections", self.addr);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill_hard(&mut self) {
        self.child.kill_hard();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.0.try_wait().expect("wait relay-server") {
                return status;
            }
            assert!(Instant::now() < deadline, "relay-server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
