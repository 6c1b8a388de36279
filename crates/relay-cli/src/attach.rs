//! `relay attach` and `relay detach`.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use relay_proto::local::{AttachRequest, Reply, Request};
use relay_tmux::{Pane, RealTmux, Tmux};

use crate::cli::AttachArgs;
use crate::daemon::{self, connect_or_start, sibling_binary};
use relay_local::intro::intro_line;
use relay_local::{agents, claude};

/// Types the intro line into `pane`, Enter separately after a pause (sent together, agents
/// sometimes drop it).
async fn type_intro(tmux: &dyn Tmux, pane: &str, display_name: &str, group: &str) -> Result<(), relay_tmux::TmuxError> {
    relay_tmux::send_literal(tmux, pane, &intro_line(display_name, group))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay_tmux::send_enter(tmux, pane)
}

pub async fn attach(socket: &Path, args: AttachArgs) -> Result<()> {
    let tmux = RealTmux::current();
    let processes = agents::processes();
    let pane = match &args.pane {
        Some(target) => relay_tmux::pane(&tmux, target).with_context(|| format!("no tmux pane {target}"))?,
        None => pick_pane(&tmux, &processes)?,
    };
    let found = agents::find_agent(pane.pid, &processes);
    let agent = found.map(|f| f.agent);
    // Claude Code's configuration as the agent sees it, which may not be ours
    let agent_env = found.filter(|f| f.agent == "claude").and_then(|f| claude::AgentEnv::of(f.pid));
    let claude_dir = agent_env.as_ref().and_then(claude::AgentEnv::claude_dir).or_else(claude::claude_dir);
    if agent.is_none() {
        let msg = format!("no coding agent ({}) runs in pane {} (it runs {})", agents::AGENTS.join(", "), pane.id, pane.current_command);
        if !args.force {
            bail!("{msg}; pass --force to attach anyway");
        }
        eprintln!("relay: warning: {msg}; attaching anyway (--force)");
    }
    let mut client = connect_or_start(socket).await?;
    let request = AttachRequest {
        pane: pane.id.clone(),
        group: args.group.clone(),
        server: args.server.clone(),
        name: args.name.clone(),
        join_key: args.join_key.clone(),
        working_directory: pane.current_path.clone(),
        git_branch: git_branch(&pane.current_path),
    };
    let (attachment, already) = match daemon::request(&mut client, &Request::Attach(request)).await? {
        Reply::Attached { attachment, already } => (attachment, already),
        other => bail!("relayd answered {other:?}"),
    };
    if already {
        println!("{} is already attached to {} as {}; nothing to do.", pane.id, attachment.group, attachment.display_name);
        return Ok(());
    }
    // Claude Code with an inbox hears everything through it, the introduction included
    let inbox = agent == Some("claude") && claude_dir.as_deref().and_then(|dir| claude::find(dir, &pane.id)).is_some();
    let sidebar = open_sidebar(&tmux, &pane, &args, socket, inbox.then_some(claude_dir.as_deref()).flatten());
    if !args.no_mcp_config {
        configure_mcp(agent, agent_env.as_ref());
    }
    if agent == Some("claude") {
        explain_inbox_once();
        if args.allow_tools
            && let Some(dir) = &claude_dir
        {
            allow_tools(&dir.join("settings.json"));
        }
    }
    if inbox && sidebar.is_some() {
        println!("Claude Code in {} has an inbox: relay delivers messages into it, with no keystrokes.", pane.id);
    } else {
        type_intro(&tmux, &pane.id, &attachment.display_name, &attachment.group).await?;
    }
    println!(
        "Attached {} ({}) to group {} on {} as {} (peer {}){}.",
        pane.id,
        agent.unwrap_or("no agent"),
        attachment.group,
        attachment.server,
        attachment.display_name,
        attachment.peer_id,
        sidebar.map(|s| format!(", sidebar {s}")).unwrap_or_default()
    );
    Ok(())
}

/// Among the panes running an agent: the only one, or the one the user picks.
fn pick_pane(tmux: &dyn Tmux, processes: &[agents::Process]) -> Result<Pane> {
    let candidates: Vec<(Pane, &str)> = relay_tmux::list_panes(tmux)
        .context("cannot list tmux panes (is tmux running?)")?
        .into_iter()
        .filter_map(|p| agents::agent_under(p.pid, processes).map(|a| (p, a)))
        .collect();
    let describe = |(p, a): &(Pane, &str)| format!("{} {} ({a}) in {}", p.id, p.target, p.current_path);
    match candidates.len() {
        0 => bail!("no tmux pane runs a coding agent ({}); name the pane: relay attach %N --group G", agents::AGENTS.join(", ")),
        1 => Ok(candidates.into_iter().next().expect("one").0),
        _ if !std::io::stdin().is_terminal() => {
            let list: Vec<String> = candidates.iter().map(describe).collect();
            bail!("several panes run an agent; name one:\n  {}", list.join("\n  "))
        }
        _ => {
            for (i, c) in candidates.iter().enumerate() {
                eprintln!("  {}) {}", i + 1, describe(c));
            }
            eprint!("attach which? [1-{}] ", candidates.len());
            std::io::stderr().flush()?;
            let mut answer = String::new();
            std::io::stdin().lock().read_line(&mut answer)?;
            let n: usize = answer.trim().parse().context("not a number")?;
            candidates.into_iter().nth(n.wrapping_sub(1)).map(|c| c.0).context("no such choice")
        }
    }
}

fn git_branch(dir: &str) -> Option<String> {
    let out = Command::new("git").args(["-C", dir, "rev-parse", "--abbrev-ref", "HEAD"]).output().ok()?;
    let branch = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !branch.is_empty() && branch != "HEAD").then_some(branch)
}

/// `relay-pane` beside the agent, if it is installed; focus stays on the agent. The socket
/// and the Claude Code session's configuration directory (given when it has an inbox) are
/// passed on: the pane starts in tmux's environment, not ours or the agent's.
fn open_sidebar(tmux: &dyn Tmux, pane: &Pane, args: &AttachArgs, socket: &Path, inbox_of: Option<&Path>) -> Option<String> {
    let bin = sibling_binary("relay-pane");
    if !bin.is_file() && which("relay-pane").is_none() {
        eprintln!("relay: relay-pane is not installed; attached without a sidebar");
        return None;
    }
    let command = format!(
        "{} --pane {} --socket {} --fallback {}{}",
        shell_quote(&bin.display().to_string()),
        pane.id,
        shell_quote(&socket.display().to_string()),
        args.fallback,
        inbox_of.map(|dir| format!(" --intro --claude-dir {}", shell_quote(&dir.display().to_string()))).unwrap_or_default()
    );
    match relay_tmux::split_beside(tmux, &pane.id, args.width, &command) {
        Ok(id) => Some(id),
        Err(e) => {
            eprintln!("relay: could not open the sidebar: {e}");
            None
        }
    }
}

/// Quoted for the shell tmux runs pane commands with.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// Makes sure the agent can call the relay's tools: for Claude Code, `relay mcp` as a
/// user-scope MCP server of the configuration the agent runs with; for others, the config to add.
fn configure_mcp(agent: Option<&str>, agent_env: Option<&claude::AgentEnv>) {
    let relay = sibling_binary("relay");
    let claude = |args: &[&str]| {
        let mut command = Command::new("claude");
        command.args(args);
        if let Some(env) = agent_env {
            env.apply(&mut command);
        }
        command
    };
    match agent {
        Some("claude") => {
            let present = claude(&["mcp", "get", "relay"]).output().is_ok_and(|o| o.status.success());
            if present {
                return;
            }
            let added = claude(&["mcp", "add", "-s", "user", "relay", "--"]).arg(&relay).arg("mcp").output();
            match added {
                Ok(o) if o.status.success() => eprintln!(
                    "relay: added `relay mcp` to Claude Code's MCP servers (user scope); a session started before \
                     this loads it after a restart (`claude --continue`)"
                ),
                _ => eprintln!(
                    "relay: could not run `claude mcp add`; add it yourself: claude mcp add -s user relay -- {} mcp",
                    relay.display()
                ),
            }
        }
        _ => {
            eprintln!("relay: give the agent the relay's tools with this MCP server (stdio): command `{}`, args [\"mcp\"]", relay.display())
        }
    }
}

/// What Claude Code's inbox needs, said once per user (a marker in relayd's state dir).
fn explain_inbox_once() {
    let marker = relay_local::paths::default_state_dir().join("claude-inbox-explained");
    if marker.exists() {
        return;
    }
    eprintln!(
        "relay: Claude Code 2.1.224 or later takes relay's messages through its inbox: no keystrokes; an idle \
         session starts a turn, a busy one reads them after its running tool call.\n\
         relay: in bypass-permissions mode Claude Code holds them until you approve them in the pane (or set \
         \"crossSessionInbound\": \"accept\" in ~/.claude/settings.json); `relay status` lists held ones.\n\
         relay: a session started before relay's MCP server was added gets relay's tools after a restart \
         (`claude --continue`); until then it reads and answers relay messages through its inbox.\n\
         relay: `relay attach --allow-tools` lets relay's tools run without a permission prompt."
    );
    let _ = std::fs::create_dir_all(marker.parent().unwrap_or(Path::new(".")));
    let _ = std::fs::write(&marker, b"");
}

fn allow_tools(settings: &Path) {
    match claude::allow_relay_tools(settings) {
        Ok(true) => eprintln!("relay: relay's tools now run without a prompt ({} allows {})", settings.display(), claude::RELAY_TOOLS_RULE),
        Ok(false) => {}
        Err(e) => eprintln!("relay: could not allow relay's tools: {e}"),
    }
}

pub async fn detach(socket: &Path, pane: Option<String>, group: Option<String>) -> Result<()> {
    let tmux = RealTmux::current();
    let target = pane.or_else(|| std::env::var("TMUX_PANE").ok()).context("which pane? name it: relay detach %N")?;
    let id = relay_tmux::pane(&tmux, &target).map(|p| p.id).unwrap_or(target);
    let mut client = connect_or_start(socket).await?;
    let groups = match daemon::request(&mut client, &Request::Detach { pane: id.clone(), group }).await? {
        Reply::Detached { groups, .. } => groups,
        other => bail!("relayd answered {other:?}"),
    };
    let still_attached = matches!(client.request(&Request::Credentials { pane: id.clone() }).await, Ok(Reply::Credentials { .. }));
    if !still_attached {
        // the command open_sidebar starts: "'…/relay-pane' --pane %3 --socket '…'"
        for sidebar in relay_tmux::panes_started_with(&tmux, &format!("relay-pane' --pane {id} --socket")).unwrap_or_default() {
            let _ = relay_tmux::kill_pane(&tmux, &sidebar);
        }
    }
    println!("Detached {id} from {}.", groups.join(", "));
    Ok(())
}
