//! Settings: defaults, then the TOML file, then environment variables, then flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::relay::Limits;
use crate::store::sqlite::Synchronous;

/// Every field has a default, so a config file names only what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddr,
    /// Where the SQLite file lives; the XDG data dir when unset.
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory (lost on exit).
    pub ephemeral: bool,
    /// Host headers accepted (DNS-rebinding protection). An entry without a port matches
    /// any port; "*" accepts every host.
    pub allowed_hosts: Vec<String>,
    pub require_join_keys: bool,
    /// Allow listening beyond loopback with no join keys.
    pub insecure: bool,
    pub max_message_bytes: usize,
    pub max_request_bytes: usize,
    pub rate_per_second: f64,
    pub rate_burst: u32,
    /// New peers one client address may register per minute (and at once).
    pub registrations_per_minute: u32,
    /// Take the client's address from the last `X-Forwarded-For` entry (behind a reverse
    /// proxy that sets it); off: the address the connection comes from.
    pub trust_forwarded_for: bool,
    pub heartbeat_secs: u64,
    /// A client gets this long to send a request head and to take each write; a connection
    /// that moves no bytes for twice as long is closed.
    pub client_timeout_secs: u64,
    pub stream_buffer: usize,
    /// An event stream writes at most once per this many milliseconds; events that come
    /// sooner wait and go out together, one write for many. 0: each as it comes.
    pub stream_write_interval_ms: u64,
    /// Bytes of new messages kept in memory for the streams, server-wide.
    pub live_buffer_bytes: usize,
    /// An MCP session (older protocol versions) idle this long is closed.
    pub session_idle_secs: u64,
    /// At most this many MCP sessions at once; the oldest unused ones make room.
    pub max_sessions: usize,
    /// An MCP session that made no request this long after `initialize` is closed.
    pub unused_session_secs: u64,
    pub synchronous: Synchronous,
    /// Answer plainly well-formed stateless `tools/call` requests without rmcp's
    /// per-request service (see `direct_calls`); off sends every request through rmcp.
    pub direct_tool_calls: bool,
    /// Run as one node of a cluster whose state lives in NATS JetStream.
    pub cluster: ClusterConfig,
}

/// `[cluster]`: where the cluster's state lives. Without `nats` the server is a single node
/// on SQLite (or memory).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:4222`); any one reachable is enough to start.
    pub nats: Vec<String>,
    /// Copies JetStream keeps of each stream and bucket; 3 survives the loss of one NATS
    /// server. Only applies when they are created (see `relay-server cluster check`).
    pub replicas: usize,
    /// This node's name in presence and logs [default: host name and process id].
    pub node_name: Option<String>,
    /// Seconds a node's presence outlives its last refresh: how long a node that died
    /// still shows its streams' peers online.
    pub presence_ttl_secs: u64,
    /// Days the log (stream `RELAY_LOG`) keeps a message; set by any node that starts with
    /// it. Unset: the stream keeps what it has (forever, as relay creates it).
    pub log_max_age_days: Option<u64>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { nats: Vec::new(), replicas: 3, node_name: None, presence_ttl_secs: 30, log_max_age_days: None }
    }
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// This node's name: the configured one, else host name and process id (unique while
    /// the process lives, which is all presence needs).
    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| format!("{}-{}", relay_util::system_hostname(), std::process::id()))
    }

    pub fn nats_options(&self) -> crate::store::nats::NatsOptions {
        crate::store::nats::NatsOptions {
            urls: self.nats.clone(),
            replicas: self.replicas,
            node: self.node(),
            presence_ttl: std::time::Duration::from_secs(self.presence_ttl_secs),
            log_max_age: self.log_max_age_days.map(|days| std::time::Duration::from_secs(days * 86_400)),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8765";

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid address"),
            data_dir: None,
            ephemeral: false,
            allowed_hosts: default_allowed_hosts(),
            require_join_keys: false,
            insecure: false,
            max_message_bytes: limits.max_message_bytes,
            max_request_bytes: 1024 * 1024,
            rate_per_second: limits.rate_per_second,
            rate_burst: limits.rate_burst,
            registrations_per_minute: limits.registrations_per_minute,
            trust_forwarded_for: false,
            heartbeat_secs: 15,
            client_timeout_secs: 30,
            stream_buffer: limits.stream_buffer,
            stream_write_interval_ms: 2,
            live_buffer_bytes: limits.live_buffer_bytes,
            session_idle_secs: 24 * 3600,
            max_sessions: 1024,
            unused_session_secs: 60,
            synchronous: Synchronous::Normal,
            direct_tool_calls: true,
            cluster: ClusterConfig::default(),
        }
    }
}

pub fn default_allowed_hosts() -> Vec<String> {
    ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec()
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: String, source: Box<toml::de::Error> },
    #[error(
        "refusing to listen on {addr}, which is reachable from other machines, while anyone could join any group. \
         Start with --require-join-keys (every group then needs a join key), or pass --insecure if this network \
         is trusted."
    )]
    OpenToTheWorld { addr: SocketAddr },
    #[error("{0}")]
    Invalid(String),
    #[error("no data directory: cannot find a home directory; pass --data-dir or --ephemeral")]
    NoDataDir,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: display.clone(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: display, source: Box::new(source) })
    }

    /// Refuses settings that would be unsafe or cannot work.
    pub fn check(&self, bound: SocketAddr) -> Result<(), ConfigError> {
        if !bound.ip().is_loopback() && !self.require_join_keys && !self.insecure {
            return Err(ConfigError::OpenToTheWorld { addr: bound });
        }
        let positive = [
            ("max_message_bytes", self.max_message_bytes as f64),
            ("max_request_bytes", self.max_request_bytes as f64),
            ("rate_burst", self.rate_burst as f64),
            ("rate_per_second", self.rate_per_second),
            ("heartbeat_secs", self.heartbeat_secs as f64),
            ("stream_buffer", self.stream_buffer as f64),
            ("live_buffer_bytes", self.live_buffer_bytes as f64),
            ("registrations_per_minute", self.registrations_per_minute as f64),
            ("max_sessions", self.max_sessions as f64),
            ("unused_session_secs", self.unused_session_secs as f64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| v.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)) {
            return Err(ConfigError::Invalid(format!("{name} must be greater than 0")));
        }
        if self.client_timeout_secs == 0 || self.heartbeat_secs >= 2 * self.client_timeout_secs {
            return Err(ConfigError::Invalid(
                "client_timeout_secs must be more than half of heartbeat_secs (heartbeats keep streams open)".into(),
            ));
        }
        if self.cluster.enabled() && (self.ephemeral || self.data_dir.is_some()) {
            return Err(ConfigError::Invalid(
                "--nats excludes --ephemeral and --data-dir: a cluster keeps its state in NATS (relay-server migrate copies a data dir there)"
                    .into(),
            ));
        }
        if self.cluster.enabled() && !(1..=5).contains(&self.cluster.replicas) {
            return Err(ConfigError::Invalid("cluster.replicas must be between 1 and 5 (JetStream's limit)".into()));
        }
        if self.cluster.log_max_age_days == Some(0) {
            return Err(ConfigError::Invalid("cluster.log_max_age_days must be at least 1 (leave it out to keep messages forever)".into()));
        }
        if self.cluster.enabled() && self.cluster.presence_ttl_secs < 3 {
            return Err(ConfigError::Invalid("cluster.presence_ttl_secs must be at least 3".into()));
        }
        if self.stream_write_interval_ms > 1000 {
            return Err(ConfigError::Invalid("stream_write_interval_ms must be at most 1000 (events would wait that long)".into()));
        }
        if self.max_request_bytes < self.max_message_bytes {
            return Err(ConfigError::Invalid("max_request_bytes must be at least max_message_bytes".into()));
        }
        Ok(())
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            rate_per_second: self.rate_per_second,
            rate_burst: self.rate_burst,
            registrations_per_minute: self.registrations_per_minute,
            stream_buffer: self.stream_buffer,
            live_buffer_bytes: self.live_buffer_bytes,
            require_join_keys: self.require_join_keys,
        }
    }

    /// The data directory, defaulting to the platform's (XDG on Linux).
    pub fn data_dir(&self) -> Result<PathBuf, ConfigError> {
        match &self.data_dir {
            Some(dir) => Ok(dir.clone()),
            None => directories::ProjectDirs::from("", "", "relay").map(|d| d.data_dir().join("server")).ok_or(ConfigError::NoDataDir),
        }
    }
}

/// relay-server: the relay that lets AI coding agents message each other.
#[derive(Debug, Parser, Default)]
#[command(version, about)]
pub struct Args {
    /// Address to listen on [default: 127.0.0.1:8765]
    #[arg(long, env = "RELAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the SQLite database [default: the XDG data dir, e.g. ~/.local/share/relay/server]
    #[arg(long, env = "RELAY_DATA_DIR", conflicts_with = "ephemeral")]
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory; nothing survives a restart
    #[arg(long, env = "RELAY_EPHEMERAL")]
    pub ephemeral: bool,
    /// Accept this Host header (repeatable); loopback names only by default; "*" for any
    #[arg(long = "allowed-host", env = "RELAY_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Every new group must be created with a join key
    #[arg(long, env = "RELAY_REQUIRE_JOIN_KEYS")]
    pub require_join_keys: bool,
    /// Allow listening on a non-loopback address without join keys
    #[arg(long, env = "RELAY_INSECURE")]
    pub insecure: bool,
    /// Largest message, in bytes [default: 65536]
    #[arg(long, env = "RELAY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Messages per second each peer may send, sustained [default: 10]
    #[arg(long, env = "RELAY_RATE_PER_SECOND")]
    pub rate_per_second: Option<f64>,
    /// Messages each peer may send in a burst [default: 50]
    #[arg(long, env = "RELAY_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Seconds between heartbeat comments on event streams [default: 15]
    #[arg(long, env = "RELAY_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u64>,
    /// Run as a cluster node on these NATS JetStream servers (comma-separated URLs)
    /// instead of SQLite; see docs/cluster.md
    #[arg(long, env = "RELAY_NATS", value_delimiter = ',', global = true)]
    pub nats: Vec<String>,
    /// TOML config file [default: ~/.config/relay/server.toml when present]
    #[arg(long, short = 'c', env = "RELAY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Operate a cluster of relay-server nodes on NATS JetStream (see docs/cluster.md)
    Cluster {
        #[command(subcommand)]
        action: ClusterCommand,
    },
    /// Copy a single server's SQLite data into an empty cluster's NATS JetStream (stop
    /// every relay-server first)
    Migrate {
        /// The single server's data directory (the one holding relay.sqlite3)
        #[arg(long)]
        from: PathBuf,
        /// The cluster's NATS servers (comma-separated URLs)
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Check that this node reaches NATS and that the streams and buckets are there,
    /// replicated as configured, with their replicas current; exits 1 if not
    Check,
}

impl Args {
    /// The file named by --config, else the default one if it exists.
    pub fn config_file(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let path = directories::ProjectDirs::from("", "", "relay")?.config_dir().join("server.toml");
            path.exists().then_some(path)
        })
    }

    /// Flags and environment variables override the file.
    pub fn apply(self, mut config: Config) -> Config {
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.data_dir {
            config.data_dir = Some(v);
            config.ephemeral = false;
        }
        config.ephemeral |= self.ephemeral;
        if !self.allowed_hosts.is_empty() {
            config.allowed_hosts = self.allowed_hosts;
        }
        config.require_join_keys |= self.require_join_keys;
        config.insecure |= self.insecure;
        if let Some(v) = self.max_message_bytes {
            config.max_message_bytes = v;
            config.max_request_bytes = config.max_request_bytes.max(v.saturating_mul(2));
        }
        if let Some(v) = self.rate_per_second {
            config.rate_per_second = v;
        }
        if let Some(v) = self.rate_burst {
            config.rate_burst = v;
        }
        if let Some(v) = self.heartbeat_secs {
            config.heartbeat_secs = v;
        }
        if !self.nats.is_empty() {
            config.cluster.nats = self.nats;
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_means_defaults_and_unknown_keys_are_errors() {
        assert_eq!(toml::from_str::<Config>("").unwrap(), Config::default());
        let c: Config = toml::from_str("listen = \"127.0.0.1:9000\"\nrequire_join_keys = true\nsynchronous = \"full\"").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert!(c.require_join_keys);
        assert_eq!(c.synchronous, Synchronous::Full);
        assert!(toml::from_str::<Config>("lisen = \"x\"").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let file: Config = toml::from_str("rate_burst = 5\nallowed_hosts = [\"a.example\"]").unwrap();
        let args = Args::parse_from(["relay-server", "--listen", "127.0.0.1:1", "--allowed-host", "b.example", "--ephemeral"]);
        let c = args.apply(file);
        assert_eq!(c.listen.port(), 1);
        assert_eq!(c.allowed_hosts, vec!["b.example"]);
        assert_eq!(c.rate_burst, 5);
        assert!(c.ephemeral);
    }

    #[test]
    fn refuses_to_open_to_the_world_without_join_keys() {
        let public: SocketAddr = "0.0.0.0:8765".parse().unwrap();
        let err = Config::default().check(public).unwrap_err().to_string();
        assert!(err.contains("--require-join-keys") && err.contains("--insecure"), "{err}");
        assert!(Config { require_join_keys: true, ..Config::default() }.check(public).is_ok());
        assert!(Config { insecure: true, ..Config::default() }.check(public).is_ok());
        assert!(Config::default().check("127.0.0.1:1".parse().unwrap()).is_ok());
        assert!(Config::default().check("[::1]:1".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let args = Args::parse_from(["relay-server", "cluster", "check", "--nats", "nats://a:4222,nats://b:4222"]);
        assert!(matches!(args.command, Some(Command::Cluster { action: ClusterCommand::Check })));
        let config = args.apply(Config::default());
        assert_eq!(config.cluster.nats, ["nats://a:4222", "nats://b:4222"]);
        let with_dir = Config { data_dir: Some("/tmp/x".into()), ..config };
        assert!(with_dir.check("127.0.0.1:1".parse().unwrap()).unwrap_err().to_string().contains("--data-dir"));
    }

    #[test]
    fn rejects_nonsense_limits() {
        let c = Config { rate_burst: 0, ..Config::default() };
        assert!(c.check("127.0.0.1:1".parse().unwrap()).unwrap_err().to_string().contains("rate_burst"));
    }
}
