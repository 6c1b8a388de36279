//! Which coding agent, if any, runs in a pane: a walk down the pane's process tree.

use std::collections::HashMap;
use std::process::Command;

/// Agents relay knows, by the name their process shows.
pub const AGENTS: &[&str] = &["claude", "codex", "gemini", "aider"];

/// One process: its parent and its command line.
#[derive(Debug, Clone)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub args: String,
}

/// Every process, from `ps` (Linux and macOS alike).
pub fn processes() -> Vec<Process> {
    let Ok(out) = Command::new("ps").args(["-A", "-o", "pid=", "-o", "ppid=", "-o", "args="]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let pid = parts.next()?.parse().ok()?;
            let ppid = parts.next()?.parse().ok()?;
            Some(Process { pid, ppid, args: parts.collect::<Vec<_>>().join(" ") })
        })
        .collect()
}

/// The agent among `root` and its descendants, by name ("claude", …).
pub fn agent_under(root: u32, processes: &[Process]) -> Option<&'static str> {
    let mut children: HashMap<u32, Vec<&Process>> = HashMap::new();
    for p in processes {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut stack = vec![root];
    let mut seen = 0;
    while let Some(pid) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        if let Some(agent) = processes.iter().find(|p| p.pid == pid).and_then(|p| agent_named(&p.args)) {
            return Some(agent);
        }
        stack.extend(children.get(&pid).into_iter().flatten().map(|p| p.pid));
    }
    None
}

/// The agent a command line runs: its program, or the script an interpreter runs
/// (`node …/codex.js`, `python3 …/aider`).
fn agent_named(args: &str) -> Option<&'static str> {
    let mut words = args.split_whitespace().map(|w| w.rsplit('/').next().unwrap_or(w).trim_start_matches('-'));
    let program = words.next()?;
    if let Some(agent) = agent_called(program) {
        return Some(agent);
    }
    let interpreter = ["node", "bun", "deno"].contains(&program) || program.starts_with("python");
    if interpreter { words.next().and_then(agent_called) } else { None }
}

fn agent_called(name: &str) -> Option<&'static str> {
    let stem = name.strip_suffix(".js").or_else(|| name.strip_suffix(".py")).unwrap_or(name);
    AGENTS.iter().copied().find(|a| stem == *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pid: u32, ppid: u32, args: &str) -> Process {
        Process { pid, ppid, args: args.into() }
    }

    #[test]
    fn finds_agents_below_the_pane_shell() {
        let tree = [
            p(100, 1, "-bash"),
            p(101, 100, "/home/me/.local/bin/claude --continue"),
            p(200, 1, "zsh"),
            p(201, 200, "node /usr/lib/node_modules/@openai/codex/bin/codex.js"),
            p(300, 1, "bash"),
            p(301, 300, "python3 /home/me/.venv/bin/aider --model x"),
            p(400, 1, "bash"),
            p(401, 400, "vim claude-notes.md"),
            p(500, 1, "bash"),
            p(501, 500, "make"),
            p(502, 501, "gemini"),
        ];
        assert_eq!(agent_under(100, &tree), Some("claude"));
        assert_eq!(agent_under(200, &tree), Some("codex"));
        assert_eq!(agent_under(300, &tree), Some("aider"));
        assert_eq!(agent_under(400, &tree), None, "an editor opening a file named like an agent is not one");
        assert_eq!(agent_under(500, &tree), Some("gemini"));
        assert_eq!(agent_under(999, &tree), None);
    }
}
