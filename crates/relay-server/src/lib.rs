//! relay-server: MCP tools over streamable HTTP, resumable event streams, durable storage.
//!
//! [`run`] serves a [`Config`] on a bound listener until `shutdown` is cancelled; the binary
//! and the tests both use it.

mod app;
mod app_state;
pub mod clock;
pub mod config;
mod console;
mod daemon_api;
mod direct_calls;
mod error;
mod front;
mod live;
mod mcp;
mod metrics;
mod rate;
mod relay;
mod secrets;
mod sessions;
mod sse;
pub mod store;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigError};
pub use error::RelayError;
pub use relay::{Caller, Limits, RegisterRequest, Relay};

/// Locks `mutex`, also after a holder panicked: every critical section in this crate leaves
/// what it guards whole at each step (an insert, a counter, a whole list), so a panic
/// elsewhere loses nothing here, and the server should not stop over it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("serving HTTP failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the store the config asks for.
pub fn open_store(config: &Config) -> Result<Arc<dyn store::Store>, ServerError> {
    if config.cluster.enabled() {
        return Ok(Arc::new(store::nats::NatsStore::open(config.cluster.nats_options())?));
    }
    if config.ephemeral {
        return Ok(Arc::new(store::MemoryStore::new()));
    }
    let dir = config.data_dir()?;
    Ok(Arc::new(store::SqliteStore::open_dir(&dir, config.synchronous)?))
}

/// `relay-server cluster check`: what this node's `[cluster]` settings find in NATS.
pub async fn cluster_check(config: &Config) -> Result<store::nats::check::CheckReport, ServerError> {
    if !config.cluster.enabled() {
        return Err(ConfigError::Invalid("no cluster to check: pass --nats URLS or set [cluster] nats in the config".into()).into());
    }
    Ok(store::nats::check::check(&config.cluster.nats_options()).await?)
}

/// `relay-server migrate`: copies the SQLite data in `from` into the cluster at `to`.
pub fn migrate(
    config: &Config,
    from: &std::path::Path,
    to: Vec<String>,
    progress: &mut dyn FnMut(&str),
) -> Result<store::migrate::Migrated, ServerError> {
    if !from.join(store::sqlite::DB_FILE).is_file() {
        return Err(ConfigError::Invalid(format!("{} holds no relay database ({})", from.display(), store::sqlite::DB_FILE)).into());
    }
    let source = store::SqliteStore::open_dir(from, config.synchronous)?;
    let cluster = config::ClusterConfig { nats: to, ..config.cluster.clone() };
    let target = store::nats::NatsStore::open(cluster.nats_options())?;
    Ok(store::migrate::migrate(&source, &target, progress)?)
}

/// Serves until `shutdown` is cancelled, then lets open requests finish and ends every
/// event stream.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServerError> {
    let addr = listener.local_addr()?;
    config.check(addr)?;
    let store = open_store(&config)?;
    let relay = Arc::new(Relay::new(store, Arc::new(clock::SystemClock), config.limits()));
    let storage = if config.cluster.enabled() {
        format!("NATS JetStream at {} (node {})", config.cluster.nats.join(","), config.cluster.node())
    } else if config.ephemeral {
        "memory (ephemeral)".to_owned()
    } else {
        config.data_dir()?.display().to_string()
    };
    tracing::info!(%addr, %storage, "relay-server listening; MCP at http://{addr}/mcp");
    serve(relay, &config, listener, shutdown).await
}

/// Serves an existing [`Relay`]; for tests that also drive it directly.
pub async fn serve(relay: Arc<Relay>, config: &Config, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServerError> {
    let app = app::router(relay, config, shutdown.clone());
    let timeouts = front::Timeouts { client: Duration::from_secs(config.client_timeout_secs) };
    front::serve(listener, app, shutdown, timeouts).await?;
    tracing::info!("relay-server stopped");
    Ok(())
}
