//! The user's relay settings (`~/.config/relay/config.toml`), read by relayd and the CLI,
//! and the one order in which every binary chooses its relay-server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("invalid config {}: {source}", path.display())]
    Invalid { path: PathBuf, source: toml::de::Error },
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
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Unreadable { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Invalid { path: path.to_owned(), source })
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
        self.hostname.clone().unwrap_or_else(relay_util::system_hostname)
    }

    /// Trailing slashes and a `/mcp` suffix name the same server.
    pub fn normalize_server(url: &str) -> String {
        url.trim().trim_end_matches('/').trim_end_matches("/mcp").to_owned()
    }
}

/// Where a choice of server came from, so messages can say why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSource {
    Flag,
    /// `$RELAY_SERVER`
    Environment,
    ConfigFile(PathBuf),
    /// The server the running relayd attaches to.
    Relayd,
    Default,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerChoice {
    /// Normalized ([`Config::normalize_server`]).
    pub url: String,
    pub source: ServerSource,
}

/// Which relay-server, decided the same way by every binary: a flag, then `$RELAY_SERVER`,
/// then the config file's `server` (`config_file`, else `$RELAY_CONFIG`, else
/// `~/.config/relay/config.toml`), then the running relayd's (`relayd` is awaited only when
/// none of those names one), then the default.
pub async fn choose_server(
    flag: Option<&str>,
    config_file: Option<PathBuf>,
    relayd: impl std::future::Future<Output = Option<String>>,
) -> ServerChoice {
    let env = std::env::var("RELAY_SERVER").ok();
    let file = config_file
        .or_else(|| std::env::var_os("RELAY_CONFIG").map(PathBuf::from))
        .or_else(paths::default_config_file)
        .and_then(|path| std::fs::read_to_string(&path).ok().map(|text| (path, text)));
    let in_file = file.as_ref().and_then(|(path, text)| server_in(text).map(|s| (path.as_path(), s)));
    let earlier = pick_server(flag, env.as_deref(), in_file, None);
    if earlier.source != ServerSource::Default {
        return earlier;
    }
    pick_server(None, None, None, relayd.await.as_deref())
}

/// [`choose_server`]'s order, given what each place says.
pub fn pick_server(flag: Option<&str>, env: Option<&str>, config: Option<(&Path, String)>, relayd: Option<&str>) -> ServerChoice {
    let named = |s: &Option<&str>| s.filter(|s| !s.trim().is_empty()).map(Config::normalize_server);
    let (url, source) = if let Some(url) = named(&flag) {
        (url, ServerSource::Flag)
    } else if let Some(url) = named(&env) {
        (url, ServerSource::Environment)
    } else if let Some((path, url)) = config.as_ref().and_then(|(p, s)| named(&Some(s.as_str())).map(|u| (p, u))) {
        (url, ServerSource::ConfigFile(path.to_path_buf()))
    } else if let Some(url) = named(&relayd) {
        (url, ServerSource::Relayd)
    } else {
        (DEFAULT_SERVER.to_owned(), ServerSource::Default)
    };
    ServerChoice { url, source }
}

/// The `server` a config file names, if it names one (the rest of the file is relayd's
/// business: a file it cannot read still names its server here).
fn server_in(text: &str) -> Option<String> {
    let table: toml::Table = toml::from_str(text).ok()?;
    table.get("server")?.as_str().map(str::to_owned)
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
        assert!(toml::from_str::<Config>("sever = 1").is_err());
    }

    #[test]
    fn the_server_is_chosen_in_one_order() {
        let file = Some((Path::new("/c.toml"), "https://file.example/".to_owned()));
        let pick = |flag, env, file: Option<(&Path, String)>, relayd| pick_server(flag, env, file, relayd);
        assert_eq!(pick(Some("http://flag/mcp"), Some("http://env"), file.clone(), Some("http://d")).url, "http://flag");
        assert_eq!(pick(None, Some("http://env"), file.clone(), Some("http://d")).source, ServerSource::Environment);
        let from_file = pick(None, None, file.clone(), Some("http://d"));
        assert_eq!((from_file.url.as_str(), from_file.source), ("https://file.example", ServerSource::ConfigFile("/c.toml".into())));
        assert_eq!(pick(None, Some(" "), None, Some("http://d")).source, ServerSource::Relayd, "an empty setting names nothing");
        assert_eq!(pick(None, None, None, None), ServerChoice { url: DEFAULT_SERVER.into(), source: ServerSource::Default });
        assert_eq!(server_in("server = \"https://r.example\"\nunknown_key = 1").as_deref(), Some("https://r.example"));
        assert_eq!(server_in("notifications = false"), None);
    }

    #[tokio::test]
    async fn relayd_is_asked_only_when_nothing_else_names_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "server = \"https://relay.example.com\"\n").unwrap();
        let chosen = choose_server(None, Some(file.clone()), async { panic!("relayd asked although the file names a server") }).await;
        assert_eq!((chosen.url.as_str(), chosen.source), ("https://relay.example.com", ServerSource::ConfigFile(file)));
        let chosen = choose_server(None, Some(dir.path().join("none.toml")), async { Some("http://10.0.0.2:8765".to_owned()) }).await;
        assert_eq!(chosen.source, ServerSource::Relayd);
    }

    #[test]
    fn server_urls_normalize() {
        assert_eq!(Config::normalize_server("http://h:1/mcp/"), "http://h:1");
        assert_eq!(Config::normalize_server("https://h/"), "https://h");
        assert!(!relay_util::system_hostname().is_empty());
    }
}
