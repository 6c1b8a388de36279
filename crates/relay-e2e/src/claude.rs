//! The real Claude Code CLI, offline: a scripted stand-in for the Messages API
//! (`python/fake_anthropic.py`) playing the model, and "machines" (a private HOME and
//! runtime dir with their own relayd and tmux server) whose panes run Claude Code sessions.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use relay_tmux::Tmux;
use serde_json::{Value, json};

use crate::tmux::TmuxServer;
use crate::{KillOnDrop, ServerProcess, binary, claude_code, claude_command, spawn_relayd, wait_until};

pub const API_KEY: &str = "sk-ant-api03-relay-test-key-0123456789abcdefXYZ";
pub const CLAUDE_VERSION: &str = "2.1.332";

/// The scripted model: one stand-in API for every session.
pub struct Model {
    rules: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    _child: KillOnDrop,
}

impl Model {
    pub fn start(dir: &Path) -> Model {
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

    pub fn script(&self, rules: Value) {
        std::fs::write(&self.rules, json!({"rules": rules, "default": {"text": "ok"}}).to_string()).unwrap();
    }

    /// Every request so far, as the latest turn's text (what the model was just told), and
    /// whether that turn carried a tool result.
    pub fn turns(&self) -> Vec<(String, bool)> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).map(|r| latest_turn(&r["body"])).collect()
    }

    /// Waits for a request whose latest turn contains `needle`; returns that turn.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> (String, bool) {
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
pub fn latest_turn(body: &Value) -> (String, bool) {
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

/// One machine: a HOME, a runtime dir, a relayd, a tmux server whose panes inherit them.
pub struct Machine {
    pub home: PathBuf,
    pub work: PathBuf,
    pub socket: PathBuf,
    pub env: Vec<(String, String)>,
    pub tmux: TmuxServer,
    /// Where Claude Code keeps its configuration and sessions.
    pub claude_dir: PathBuf,
    /// Set for Claude Code alone (not the tmux server, nor `relay attach`), when it has a
    /// `CLAUDE_CONFIG_DIR` of its own.
    claude_config_dir: Option<PathBuf>,
    /// The relayd this harness started; None when `relay attach` is left to start one.
    relayd: Option<KillOnDrop>,
}

/// How a machine starts.
#[derive(Default)]
pub struct Setup {
    /// As a new user meets relay: no relayd running, the server named only in
    /// `~/.config/relay/config.toml`; `relay attach` starts relayd.
    pub cold: bool,
    /// Claude Code runs with `CLAUDE_CONFIG_DIR` set to this directory under HOME.
    pub claude_config_dir: Option<&'static str>,
}

impl Machine {
    pub fn start(test: &str, name: &str, root: &Path, server: &ServerProcess, model: &Model, claude: &Path) -> Option<Machine> {
        Self::start_with(test, name, root, server, model, claude, Setup::default())
    }

    pub fn start_with(
        test: &str,
        name: &str,
        root: &Path,
        server: &ServerProcess,
        model: &Model,
        claude: &Path,
        setup: Setup,
    ) -> Option<Machine> {
        let dir = root.join(name);
        let (home, run, work, bin) = (dir.join("home"), dir.join("run"), dir.join("work"), dir.join("bin"));
        for d in [&home, &run, &work, &bin] {
            std::fs::create_dir_all(d).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(claude, bin.join("claude")).unwrap();
        let work = std::fs::canonicalize(&work).unwrap();
        let (relayd, socket) = if setup.cold {
            let config = home.join(".config/relay");
            std::fs::create_dir_all(&config).unwrap();
            std::fs::write(config.join("config.toml"), format!("server = \"{}\"\n", server.url(""))).unwrap();
            (None, run.join("relay/relayd.sock"))
        } else {
            let (relayd, socket) = spawn_relayd(&dir, &server.url(""), &["--no-notifications"], &[], Stdio::null());
            (Some(relayd), socket)
        };
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut env: Vec<(String, String)> = [
            ("HOME", home.display().to_string()),
            ("XDG_RUNTIME_DIR", run.display().to_string()),
            ("XDG_CONFIG_HOME", home.join(".config").display().to_string()),
            ("XDG_STATE_HOME", home.join(".local/state").display().to_string()),
            ("PATH", path),
            ("RELAYD_SOCKET", socket.display().to_string()),
            ("ANTHROPIC_BASE_URL", format!("http://127.0.0.1:{}", model.port)),
            ("ANTHROPIC_API_KEY", API_KEY.to_owned()),
            ("IS_SANDBOX", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for quiet in crate::CLAUDE_QUIET_ENV {
            env.push((quiet.to_owned(), "1".to_owned()));
        }
        if setup.cold {
            // the panes find relayd (and the server) where a user's shell would
            env.retain(|(k, _)| k != "RELAYD_SOCKET");
        }
        let tmux = TmuxServer::start_with_env(test, name, &env)?;
        if !setup.cold {
            wait_until("relayd", Duration::from_secs(10), || socket.exists());
        }
        let claude_config_dir = setup.claude_config_dir.map(|d| home.join(d));
        let claude_dir = claude_config_dir.clone().unwrap_or_else(|| home.join(".claude"));
        // first-run screens answered, the work dir trusted, relay's tools allowed
        let config = json!({
            "hasCompletedOnboarding": true, "lastOnboardingVersion": CLAUDE_VERSION, "theme": "dark",
            "hasSeenAutoDefaultNudge": true,
            "customApiKeyResponses": {"approved": [&API_KEY[API_KEY.len() - 20..]], "rejected": []},
            "projects": {work.display().to_string(): {"hasTrustDialogAccepted": true}},
        });
        std::fs::create_dir_all(&claude_dir).unwrap();
        // (with a CLAUDE_CONFIG_DIR, Claude Code keeps .claude.json there)
        for at in [&home, &claude_dir] {
            std::fs::write(at.join(".claude.json"), config.to_string()).unwrap();
        }
        let settings = json!({
            "permissions": {"defaultMode": "default", "allow": ["mcp__relay", "Bash(sleep:*)"]},
            "skipDangerousModePermissionPrompt": true,
        });
        std::fs::write(claude_dir.join("settings.json"), settings.to_string()).unwrap();
        Some(Machine { home, work, socket, env, tmux, claude_dir, claude_config_dir, relayd })
    }

    /// A `claude` command for this machine's configuration.
    fn claude(&self, claude: &Path) -> std::process::Command {
        let mut cmd = claude_command(claude, &self.home);
        if let Some(dir) = &self.claude_config_dir {
            cmd.env("CLAUDE_CONFIG_DIR", dir);
        }
        cmd
    }

    /// Adds `relay mcp` to this machine's Claude Code, as an earlier `relay attach` would.
    pub fn configure_relay_mcp(&self, claude: &Path) {
        let out = self.claude(claude).args(["mcp", "add", "-s", "user", "relay", "--"]).arg(binary("relay")).arg("mcp").output().unwrap();
        assert!(out.status.success(), "claude mcp add: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The registry entry (`~/.claude/sessions/<pid>.json`) of the session in `pane`.
    pub fn session_entry(&self, pane: &str) -> Option<Value> {
        std::fs::read_dir(self.claude_dir.join("sessions")).ok()?.flatten().find_map(|e| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
            v["tmux"].as_str()?.ends_with(&format!(".{pane}")).then_some(v)
        })
    }

    /// Whether the session in `pane` is idle, by its registry entry.
    pub fn session_idle(&self, pane: &str) -> bool {
        self.session_entry(pane).is_some_and(|v| v["status"] == "idle")
    }

    /// Starts Claude Code in a new pane and waits for its session to be idle; the pane id.
    pub fn start_claude(&self, args: &str) -> String {
        let env = match &self.claude_config_dir {
            Some(dir) => format!("CLAUDE_CONFIG_DIR='{}' ", dir.display()),
            None => String::new(),
        };
        let pane = self.tmux.new_pane(&self.work.display().to_string(), &format!("{env}claude {args}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.session_idle(&pane) {
            assert!(Instant::now() < deadline, "Claude Code in {pane} never became idle; its screen:\n{}", self.screen(&pane));
            std::thread::sleep(Duration::from_millis(50));
        }
        pane
    }

    /// Sets one key of this machine's `~/.claude/settings.json`.
    pub fn set_setting(&self, key: &str, value: Value) {
        let path = self.home.join(".claude/settings.json");
        let mut settings: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        settings[key] = value;
        std::fs::write(&path, settings.to_string()).unwrap();
    }

    pub fn attach(&self, pane: &str, name: &str) -> String {
        self.attach_with(pane, name, &[])
    }

    /// `relay attach` with more options.
    pub fn attach_with(&self, pane: &str, name: &str, options: &[&str]) -> String {
        let mut args = vec!["attach", pane, "--group", "cc", "--name", name];
        args.extend(options);
        let out = self.tmux.relay(&self.socket, &args, &self.env);
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "relay attach {pane}: {said}");
        said
    }

    pub fn screen(&self, pane: &str) -> String {
        self.tmux.tmux.run(&["capture-pane", "-p", "-S", "-", "-t", pane]).unwrap_or_default()
    }

    /// Types a prompt, as the human at this pane would.
    pub fn prompt(&self, pane: &str, text: &str) {
        relay_tmux::send_literal(&self.tmux.tmux, pane, text).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        relay_tmux::send_enter(&self.tmux.tmux, pane).unwrap();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        match &mut self.relayd {
            Some(relayd) => relayd.kill_hard(),
            // the relayd `relay attach` started for this machine, by the pid it reports
            None => {
                let out = self.tmux.relay(&self.socket, &["status", "--json"], &self.env);
                let pid = serde_json::from_slice::<Value>(&out.stdout).ok().and_then(|s| s["pid"].as_u64());
                if let Some(pid) = pid {
                    let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
                }
            }
        }
    }
}

pub struct World {
    _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub server: ServerProcess,
    pub model: Model,
    pub claude: PathBuf,
}

pub fn world(test: &str) -> Option<World> {
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
    pub fn machine(&self, test: &str, name: &str) -> Option<Machine> {
        Machine::start(test, name, &self.root, &self.server, &self.model, &self.claude)
    }

    pub fn machine_with(&self, test: &str, name: &str, setup: Setup) -> Option<Machine> {
        Machine::start_with(test, name, &self.root, &self.server, &self.model, &self.claude, setup)
    }
}
