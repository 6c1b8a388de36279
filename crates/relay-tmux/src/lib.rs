//! tmux behind a small trait, so the logic that drives it is testable without a terminal,
//! and one real implementation that runs the `tmux` binary (tested against a real server).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TmuxError {
    #[error("cannot run tmux: {0} (is tmux installed?)")]
    Spawn(std::io::Error),
    #[error("tmux {args}: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Runs one tmux command and returns its stdout.
pub trait Tmux: Send + Sync {
    fn run(&self, args: &[&str]) -> Result<String, TmuxError>;
}

/// The `tmux` binary, talking to the server of `$TMUX`, or to a named (`-L`) or pathed
/// (`-S`) server.
#[derive(Debug, Clone, Default)]
pub struct RealTmux {
    socket_name: Option<String>,
    socket_path: Option<PathBuf>,
}

impl RealTmux {
    /// The server this process runs inside (or the default one).
    pub fn current() -> Self {
        Self::default()
    }

    /// The server started with `tmux -L name`.
    pub fn named(name: &str) -> Self {
        Self { socket_name: Some(name.to_owned()), socket_path: None }
    }

    pub fn at(path: PathBuf) -> Self {
        Self { socket_name: None, socket_path: Some(path) }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("tmux");
        if let Some(name) = &self.socket_name {
            cmd.args(["-L", name]);
        }
        if let Some(path) = &self.socket_path {
            cmd.arg("-S").arg(path);
        }
        cmd
    }
}

impl Tmux for RealTmux {
    fn run(&self, args: &[&str]) -> Result<String, TmuxError> {
        let out = self.command().args(args).output().map_err(TmuxError::Spawn)?;
        if !out.status.success() {
            return Err(TmuxError::Failed { args: args.join(" "), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A scripted tmux for unit tests: records every call, answers from a queue.
#[derive(Default)]
pub struct FakeTmux {
    pub calls: Mutex<Vec<Vec<String>>>,
    answers: Mutex<Vec<(String, Result<String, String>)>>,
}

impl FakeTmux {
    /// The next call whose first argument is `command` answers `answer` (an Err is stderr).
    pub fn answer(&self, command: &str, answer: Result<&str, &str>) {
        let answer = answer.map(str::to_owned).map_err(str::to_owned);
        self.answers.lock().unwrap().push((command.to_owned(), answer));
    }

    pub fn calls(&self) -> Vec<Vec<String>> {
        self.calls.lock().unwrap().clone()
    }
}

impl Tmux for FakeTmux {
    fn run(&self, args: &[&str]) -> Result<String, TmuxError> {
        self.calls.lock().unwrap().push(args.iter().map(|a| a.to_string()).collect());
        let mut answers = self.answers.lock().unwrap();
        let found = answers.iter().position(|(cmd, _)| args.first() == Some(&cmd.as_str()));
        match found.map(|i| answers.remove(i).1) {
            Some(Ok(out)) => Ok(out),
            Some(Err(stderr)) => Err(TmuxError::Failed { args: args.join(" "), stderr }),
            None => Ok(String::new()),
        }
    }
}

/// What relay needs to know about a pane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pane {
    /// `%3`
    pub id: String,
    /// The pane's shell (or whatever it started with).
    pub pid: u32,
    pub current_command: String,
    pub current_path: String,
    /// `session:window.pane`
    pub target: String,
    /// In copy mode (or another mode): typing would go to the mode, not the program.
    pub in_mode: bool,
    pub width: u32,
    /// Where the cursor is: column and row of the visible screen.
    pub cursor: (u32, u32),
}

const PANE_FORMAT: &str = "#{pane_id}\t#{pane_pid}\t#{pane_current_command}\t#{pane_current_path}\t\
     #{session_name}:#{window_index}.#{pane_index}\t#{pane_in_mode}\t#{pane_width}\t#{cursor_x}\t#{cursor_y}";

fn parse_pane(line: &str) -> Option<Pane> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() != 9 {
        return None;
    }
    Some(Pane {
        id: f[0].to_owned(),
        pid: f[1].parse().ok()?,
        current_command: f[2].to_owned(),
        current_path: f[3].to_owned(),
        target: f[4].to_owned(),
        in_mode: f[5] == "1",
        width: f[6].parse().unwrap_or(0),
        cursor: (f[7].parse().unwrap_or(0), f[8].parse().unwrap_or(0)),
    })
}

/// The pane `target` names (`%3`, `sess:1.0`, …).
pub fn pane(tmux: &dyn Tmux, target: &str) -> Result<Pane, TmuxError> {
    let out = tmux.run(&["display-message", "-p", "-t", target, PANE_FORMAT])?;
    parse_pane(out.trim_end_matches('\n'))
        .ok_or_else(|| TmuxError::Failed { args: format!("display-message -t {target}"), stderr: format!("unexpected answer {out:?}") })
}

/// Every pane of the server.
pub fn list_panes(tmux: &dyn Tmux) -> Result<Vec<Pane>, TmuxError> {
    Ok(tmux.run(&["list-panes", "-a", "-F", PANE_FORMAT])?.lines().filter_map(parse_pane).collect())
}

/// Splits the window beside `target`, `width` columns wide, running `command`; focus stays
/// where it was. Returns the new pane's id.
pub fn split_beside(tmux: &dyn Tmux, target: &str, width: u32, command: &str) -> Result<String, TmuxError> {
    let width = width.to_string();
    let out = tmux.run(&["split-window", "-h", "-d", "-t", target, "-l", &width, "-P", "-F", "#{pane_id}", command])?;
    Ok(out.trim().to_owned())
}

/// Types `text` literally (no key names are interpreted).
pub fn send_literal(tmux: &dyn Tmux, pane: &str, text: &str) -> Result<(), TmuxError> {
    // tmux takes an argument's trailing ';' as a command separator; "\;" is a literal one
    let escaped;
    let text = match text.strip_suffix(';') {
        Some(rest) => {
            escaped = format!("{rest}\\;");
            escaped.as_str()
        }
        None => text,
    };
    tmux.run(&["send-keys", "-t", pane, "-l", "--", text]).map(drop)
}

pub fn send_enter(tmux: &dyn Tmux, pane: &str) -> Result<(), TmuxError> {
    send_keys(tmux, pane, &["Enter"])
}

/// Named keys (`Enter`, `Down`, `C-c`), as tmux's send-keys reads them.
pub fn send_keys(tmux: &dyn Tmux, pane: &str, keys: &[&str]) -> Result<(), TmuxError> {
    let mut args = vec!["send-keys", "-t", pane];
    args.extend_from_slice(keys);
    tmux.run(&args).map(drop)
}

/// The visible screen of a pane with wrapped lines joined: what was typed shows whole.
pub fn capture_joined(tmux: &dyn Tmux, pane: &str) -> Result<String, TmuxError> {
    tmux.run(&["capture-pane", "-p", "-J", "-t", pane])
}

/// The visible screen of a pane, as text.
pub fn capture(tmux: &dyn Tmux, pane: &str) -> Result<String, TmuxError> {
    tmux.run(&["capture-pane", "-p", "-t", pane])
}

pub fn kill_pane(tmux: &dyn Tmux, pane: &str) -> Result<(), TmuxError> {
    tmux.run(&["kill-pane", "-t", pane]).map(drop)
}

/// The panes whose start command contains `needle` (to find a pane's sidebar).
pub fn panes_started_with(tmux: &dyn Tmux, needle: &str) -> Result<Vec<String>, TmuxError> {
    let out = tmux.run(&["list-panes", "-a", "-F", "#{pane_id}\t#{pane_start_command}"])?;
    Ok(out.lines().filter_map(|l| l.split_once('\t')).filter(|(_, cmd)| cmd.contains(needle)).map(|(id, _)| id.to_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_panes_and_builds_the_right_commands() {
        let fake = FakeTmux::default();
        fake.answer("display-message", Ok("%3\t4242\tclaude\t/home/me/api\twork:1.0\t0\t120\t7\t23\n"));
        let p = pane(&fake, "%3").unwrap();
        assert_eq!(
            p,
            Pane {
                id: "%3".into(),
                pid: 4242,
                current_command: "claude".into(),
                current_path: "/home/me/api".into(),
                target: "work:1.0".into(),
                in_mode: false,
                width: 120,
                cursor: (7, 23),
            }
        );
        fake.answer("split-window", Ok("%9\n"));
        assert_eq!(split_beside(&fake, "%3", 40, "relay-pane --pane %3").unwrap(), "%9");
        send_literal(&fake, "%3", "-not a flag").unwrap();
        send_literal(&fake, "%3", "ends;").unwrap();
        let calls = fake.calls();
        assert_eq!(calls[1], ["split-window", "-h", "-d", "-t", "%3", "-l", "40", "-P", "-F", "#{pane_id}", "relay-pane --pane %3"]);
        assert_eq!(calls[2], ["send-keys", "-t", "%3", "-l", "--", "-not a flag"]);
        assert_eq!(calls[3], ["send-keys", "-t", "%3", "-l", "--", "ends\\;"]);
        fake.answer("display-message", Err("can't find pane: %99"));
        assert!(pane(&fake, "%99").unwrap_err().to_string().contains("can't find pane"));
    }
}
