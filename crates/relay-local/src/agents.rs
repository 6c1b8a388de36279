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

/// An agent process found in a pane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// "claude", "codex", …
    pub agent: &'static str,
    /// The innermost process that runs it (past wrappers that do not `exec`), whose
    /// environment is the agent's own.
    pub pid: u32,
}

/// Whether `pid` is `root` or runs below it, by the parent links in `processes`.
pub fn runs_under(pid: u32, root: u32, processes: &[Process]) -> bool {
    let parent: HashMap<u32, u32> = processes.iter().map(|p| (p.pid, p.ppid)).collect();
    let mut at = pid;
    // bounded: a pid reused while `ps` ran could close a loop
    for _ in 0..processes.len() + 1 {
        if at == root {
            return true;
        }
        match parent.get(&at) {
            Some(&up) if up != at && up != 0 => at = up,
            _ => return false,
        }
    }
    false
}

/// The agent among `root` and its descendants, by name ("claude", …).
pub fn agent_under(root: u32, processes: &[Process]) -> Option<&'static str> {
    find_agent(root, processes).map(|f| f.agent)
}

/// The agent among `root` and its descendants, and the process that runs it.
pub fn find_agent(root: u32, processes: &[Process]) -> Option<Found> {
    let mut children: HashMap<u32, Vec<&Process>> = HashMap::new();
    for p in processes {
        children.entry(p.ppid).or_default().push(p);
    }
    let named = |pid: u32| processes.iter().find(|p| p.pid == pid).and_then(|p| agent_named(&p.args));
    let mut stack = vec![root];
    let mut seen = 0;
    while let Some(pid) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        if let Some(agent) = named(pid) {
            // a wrapper (`bash ~/bin/claude`, `npx …`) runs the agent as its child: go down
            // to the last process of the same agent
            let mut found = Found { agent, pid };
            while let Some(inner) = children.get(&found.pid).into_iter().flatten().find(|c| named(c.pid) == Some(agent)) {
                found.pid = inner.pid;
            }
            return Some(found);
        }
        stack.extend(children.get(&pid).into_iter().flatten().map(|p| p.pid));
    }
    None
}

/// What runs a script or package rather than being the program itself.
enum Launcher {
    /// node, bun, deno, python: the first argument is a script.
    Interpreter,
    /// sh, bash, zsh, …: the first argument is a script (or, with -c, a command).
    Shell,
    /// npx, bunx, pnpx: the first argument is a package.
    PackageRunner,
    /// npm exec, pnpm dlx, yarn dlx, bun x: a subcommand, then a package.
    PackageManager,
}

fn launcher(program: &str) -> Option<Launcher> {
    Some(match program {
        "node" | "nodejs" | "bun" | "deno" => Launcher::Interpreter,
        p if p.starts_with("python") => Launcher::Interpreter,
        "sh" | "bash" | "zsh" | "dash" | "ksh" | "fish" => Launcher::Shell,
        "npx" | "bunx" | "pnpx" => Launcher::PackageRunner,
        "npm" | "pnpm" | "yarn" => Launcher::PackageManager,
        _ => return None,
    })
}

/// The agent a command line runs: its program, or what a shell, an interpreter or a
/// package runner runs (`bash ~/bin/claude`, `node …/claude-code/cli.js`, `npx @openai/codex`).
fn agent_named(args: &str) -> Option<&'static str> {
    let mut words = args.split_whitespace();
    let program = base_name(words.next()?).trim_start_matches('-'); // "-bash": a login shell
    if let Some(agent) = agent_called(program) {
        return Some(agent);
    }
    let launcher = launcher(program)?;
    // options come first; a shell's `-c` is followed by its command, which is what counts
    let mut operands = words.filter(|w| !w.starts_with('-'));
    match launcher {
        Launcher::Shell => operands.next().and_then(|w| agent_called(base_name(w))),
        Launcher::Interpreter => {
            let script = operands.find(|w| *w != "run")?; // `deno run script`
            agent_called(base_name(script)).or_else(|| agent_of_package_path(script))
        }
        Launcher::PackageRunner => operands.next().and_then(agent_of_package),
        Launcher::PackageManager => {
            let sub = operands.next()?;
            if !["exec", "dlx", "x"].contains(&sub) {
                return None;
            }
            operands.next().and_then(agent_of_package)
        }
    }
}

fn base_name(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

fn agent_called(name: &str) -> Option<&'static str> {
    let stem = name.strip_suffix(".js").or_else(|| name.strip_suffix(".mjs")).or_else(|| name.strip_suffix(".py")).unwrap_or(name);
    AGENTS.iter().copied().find(|a| stem == *a)
}

/// Agents by the name of the package that ships them (npm's without its scope, PyPI's).
const PACKAGES: &[(&str, &str)] = &[("claude-code", "claude"), ("codex", "codex"), ("gemini-cli", "gemini"), ("aider-chat", "aider")];

/// `@anthropic-ai/claude-code@2.1.0`, `@openai/codex`, `aider-chat`: the agent the package ships.
fn agent_of_package(spec: &str) -> Option<&'static str> {
    // a version follows the last '@' that is not the scope's
    let name = match spec.rfind('@') {
        Some(at) if at > 0 => &spec[..at],
        _ => spec,
    };
    let name = base_name(name);
    PACKAGES.iter().find(|(package, _)| *package == name).map(|(_, agent)| *agent).or_else(|| agent_called(name))
}

/// A script inside an agent's installed package: `…/node_modules/@anthropic-ai/claude-code/cli.js`.
/// Only the package the script belongs to counts (what follows the last node_modules), not
/// a dependency installed inside an agent's folder.
fn agent_of_package_path(script: &str) -> Option<&'static str> {
    let own = script.rsplit_once("/node_modules/").map_or(script, |(_, rest)| rest);
    let mut dirs: Vec<&str> = own.split('/').collect();
    dirs.pop(); // the file
    dirs.iter().rev().find_map(|dir| PACKAGES.iter().find(|(package, _)| package == dir).map(|(_, agent)| *agent))
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
        assert!(runs_under(502, 500, &tree) && runs_under(500, 500, &tree));
        assert!(!runs_under(502, 100, &tree), "another pane's process");
        assert!(!runs_under(999, 100, &tree), "an unknown process");
        assert!(!runs_under(7, 100, &[p(7, 8, "a"), p(8, 7, "b")]), "a loop ends");
    }

    #[test]
    fn finds_agents_started_through_wrappers() {
        let one = |args: &str| agent_under(2, &[p(1, 0, "-zsh"), p(2, 1, args)]);
        // a shell script named like the agent
        assert_eq!(one("bash /home/me/bin/claude"), Some("claude"));
        assert_eq!(one("/bin/sh -e /usr/local/bin/codex --full-auto"), Some("codex"));
        assert_eq!(one("zsh -c claude --continue"), Some("claude"));
        // the npm package's script, run by node
        assert_eq!(one("node /home/me/.npm-global/lib/node_modules/@anthropic-ai/claude-code/cli.js"), Some("claude"));
        assert_eq!(
            one("node --no-warnings --enable-source-maps /usr/lib/node_modules/@anthropic-ai/claude-code/cli.js -c"),
            Some("claude")
        );
        assert_eq!(one("node /opt/node_modules/@google/gemini-cli/dist/index.js"), Some("gemini"));
        assert_eq!(one("bun /home/me/.bun/install/global/node_modules/@openai/codex/bin/codex.js"), Some("codex"));
        assert_eq!(one("python3 -m aider --model x"), Some("aider"));
        // package runners
        assert_eq!(one("npx @openai/codex"), Some("codex"));
        assert_eq!(one("npx -y @anthropic-ai/claude-code@2.1.332"), Some("claude"));
        assert_eq!(one("bunx @google/gemini-cli"), Some("gemini"));
        assert_eq!(one("npm exec @openai/codex"), Some("codex"));
        assert_eq!(one("pnpm dlx @anthropic-ai/claude-code"), Some("claude"));
        assert_eq!(one("uvx aider-chat"), None, "uvx is not a runner relay knows (its child python is)");
        // not agents
        assert_eq!(one("bash /home/me/bin/claude-notes.sh"), None);
        assert_eq!(one("bash"), None);
        assert_eq!(one("zsh -c make test"), None);
        assert_eq!(one("node server.js"), None);
        assert_eq!(one("node /x/node_modules/@anthropic-ai/claude-code/node_modules/ws/lib/cli.js"), None, "a dependency of the agent");
        assert_eq!(one("less /usr/lib/node_modules/@anthropic-ai/claude-code/README.md"), None);
        assert_eq!(one("npx prettier --write claude.js"), None);
        assert_eq!(one("npm install @openai/codex"), None, "installing is not running");
        assert_eq!(one("cat codex"), None);
    }

    #[test]
    fn the_agent_process_is_the_innermost_one() {
        let tree = [
            p(1, 0, "-bash"),
            p(2, 1, "bash /home/me/bin/claude"),
            p(3, 2, "/home/me/.local/bin/claude --continue"),
            p(4, 3, "/home/me/.cargo/bin/relay mcp"),
            p(10, 0, "-bash"),
            p(11, 10, "npm exec @openai/codex"),
            p(12, 11, "sh -c codex"),
            p(13, 12, "node /home/me/.npm/_npx/1/node_modules/@openai/codex/bin/codex.js"),
        ];
        assert_eq!(find_agent(1, &tree), Some(Found { agent: "claude", pid: 3 }));
        assert_eq!(find_agent(10, &tree), Some(Found { agent: "codex", pid: 13 }));
    }
}
