//! Settings: defaults, then `~/.config/relay/config.toml`, then environment, then flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::paths;

/// Every field has a default, so a config file names only what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The relay-server used when an attach names none.
    pub server: String,
    /// The group `relay attach` uses when given none.
    pub default_group: Option<String>,
    /// Desktop notifications for DMs to local panes.
    pub notifications: bool,
    /// Join keys by server URL, used when an attach brings none.
    pub join_keys: BTreeMap<String, String>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// The longest wait between reconnection attempts, in seconds.
    pub reconnect_max_secs: u64,
    /// This machine's name as peers see it; the system hostname when unset.
    pub hostname: Option<String>,
}

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8765";

impl Default for Config {
    fn default() -> Self {
        Self {
            server: DEFAULT_SERVER.to_owned(),
            default_group: None,
            notifications: true,
            join_keys: BTreeMap::new(),
            socket: None,
            state_dir: None,
            reconnect_max_secs: 30,
            hostname: None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(paths::default_socket)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(paths::default_state_dir)
    }

    pub fn reconnect_max(&self) -> Duration {
        Duration::from_secs(self.reconnect_max_secs.max(1))
    }

    pub fn hostname(&self) -> String {
        self.hostname.clone().unwrap_or_else(system_hostname)
    }

    /// Trailing slashes and a `/mcp` suffix name the same server.
    pub fn normalize_server(url: &str) -> String {
        url.trim().trim_end_matches('/').trim_end_matches("/mcp").to_owned()
    }
}

pub fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
}

/// relayd: the per-user relay daemon.
#[derive(Debug, Parser, Default)]
#[command(version, about)]
pub struct Args {
    /// Control socket [default: $XDG_RUNTIME_DIR/relay/relayd.sock]
    #[arg(long, env = "RELAYD_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Where attachments and stream positions persist [default: ~/.local/state/relay/relayd]
    #[arg(long, env = "RELAYD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The relay-server for attaches that name none [default: http://127.0.0.1:8765]
    #[arg(long, env = "RELAY_SERVER")]
    pub server: Option<String>,
    /// Turn desktop notifications off
    #[arg(long, env = "RELAYD_NO_NOTIFICATIONS")]
    pub no_notifications: bool,
    /// Config file [default: ~/.config/relay/config.toml]
    #[arg(long, short = 'c', env = "RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Args {
    pub fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| paths::default_config_file().filter(|p| p.exists()))
    }

    pub fn apply(self, mut config: Config) -> Config {
        if self.socket.is_some() {
            config.socket = self.socket;
        }
        if self.state_dir.is_some() {
            config.state_dir = self.state_dir;
        }
        if let Some(server) = self.server {
            config.server = server;
        }
        if self.no_notifications {
            config.notifications = false;
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        assert_eq!(toml::from_str::<Config>("").unwrap(), Config::default());
        let file: Config = toml::from_str(
            "server = \"https://relay.example.com\"\nnotifications = false\n[join_keys]\n\"https://relay.example.com\" = \"k\"",
        )
        .unwrap();
        assert!(!file.notifications);
        assert_eq!(file.join_keys["https://relay.example.com"], "k");
        let args = Args::parse_from(["relayd", "--server", "http://127.0.0.1:1"]);
        let c = args.apply(file);
        assert_eq!(c.server, "http://127.0.0.1:1");
        assert!(toml::from_str::<Config>("sever = 1").is_err());
    }

    #[test]
    fn server_urls_normalize() {
        assert_eq!(Config::normalize_server("http://h:1/mcp/"), "http://h:1");
        assert_eq!(Config::normalize_server("https://h/"), "https://h");
        assert!(!system_hostname().is_empty());
    }
}
