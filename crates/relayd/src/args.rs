//! relayd's command line: flags and environment over the config file.

use std::path::PathBuf;

use clap::Parser;
use relay_local::config::Config;
use relay_local::paths;

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
    fn flags_override_the_file() {
        let file = Config { server: "https://relay.example.com".into(), notifications: false, ..Config::default() };
        let args = Args::parse_from(["relayd", "--server", "http://127.0.0.1:1"]);
        let c = args.apply(file);
        assert_eq!(c.server, "http://127.0.0.1:1");
        assert!(!c.notifications);
    }
}
