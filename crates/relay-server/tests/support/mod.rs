//! An in-process relay-server on 127.0.0.1:0 and clients for it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

#[allow(unused_imports)]
pub use relay_e2e::mcp::{Client, Mode, text};
#[allow(unused_imports)]
pub use relay_e2e::sse::{EventStream, LONG, SHORT, Sse};
use relay_server::clock::SystemClock;
use relay_server::{Config, Relay};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub addr: SocketAddr,
    pub relay: Arc<Relay>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Ephemeral storage, generous rate limits, unless `tweak` says otherwise.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config { ephemeral: true, rate_burst: 10_000, rate_per_second: 10_000.0, ..Config::default() };
        config.data_dir = Some(dir.path().join("data"));
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = relay_server::open_store(&config).unwrap();
        let relay = Arc::new(Relay::new(store, Arc::new(SystemClock), config.limits()));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let (relay, shutdown) = (relay.clone(), shutdown.clone());
            async move { relay_server::serve(relay, &config, listener, shutdown).await.unwrap() }
        });
        Self { addr, relay, shutdown, task: Some(task), _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A client on the stateless protocol version, with a bearer token if given.
    pub async fn client(&self, token: Option<&str>) -> Client {
        self.client_with(token, Mode::Stateless).await
    }

    pub async fn client_with(&self, token: Option<&str>, mode: Mode) -> Client {
        Client::connect(&self.url("/mcp"), token, mode).await
    }

    /// Registers a fresh agent and returns a client that sends its token as a header.
    pub async fn peer(&self, group: &str, dir: &str) -> (Client, Value) {
        let anon = self.client(None).await;
        let reg = anon.ok("register", json!({"group_id": group, "hostname": "box", "working_directory": dir})).await;
        let client = self.client(Some(reg["token"].as_str().unwrap())).await;
        (client, reg)
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task).await.expect("server stops").unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
