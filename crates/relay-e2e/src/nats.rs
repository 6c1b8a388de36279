//! A real NATS JetStream cluster on 127.0.0.1, one `nats-server` child per node, for the
//! cluster-mode tests and the bench. `tests/run` installs the server from PyPI.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{KillOnDrop, require};

/// The `nats-server` binary `tests/run` installed (`RELAY_TEST_NATS_SERVER`), or one on PATH.
pub fn nats_server(test: &str) -> Option<PathBuf> {
    let from_env = std::env::var_os("RELAY_TEST_NATS_SERVER").map(PathBuf::from).filter(|p| p.exists());
    let on_path = || {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path).map(|d| d.join("nats-server")).find(|p| p.is_file())
    };
    require(test, "nats-server (RELAY_TEST_NATS_SERVER)", from_env.or_else(on_path))
}

/// One node: its ports stay the same across restarts, and so does its store.
struct Node {
    name: String,
    client_port: u16,
    config: PathBuf,
    child: Option<KillOnDrop>,
}

/// A JetStream cluster of `nats-server` processes, stopped when dropped.
pub struct NatsCluster {
    bin: PathBuf,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `size` nodes routed to each other and waits until each accepts clients.
    /// `None` (the test is skipped) when no nats-server is installed outside CI.
    pub fn start(test: &str, size: usize) -> Option<Self> {
        let bin = nats_server(test)?;
        // A port found free may be taken by another test's process before the server binds
        // it (a dozen clusters start at once in the suite): then again, with other ports.
        const TRIES: usize = 3;
        for attempt in 1..=TRIES {
            match Self::try_start(&bin, size) {
                Ok(cluster) => return Some(cluster),
                Err(why) if attempt < TRIES => eprintln!("{test}: the NATS cluster did not start ({why}); again with other ports"),
                Err(why) => panic!("{test}: the NATS cluster did not start {TRIES} times; the last time: {why}"),
            }
        }
        unreachable!("the last try returns or panics")
    }

    fn try_start(bin: &Path, size: usize) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes: Vec<String> = route_ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        let nodes = (0..size)
            .map(|i| {
                let name = format!("n{}", i + 1);
                let config = dir.path().join(format!("{name}.conf"));
                let cluster = if size > 1 {
                    format!("cluster {{ name: relay-test, listen: \"127.0.0.1:{}\", routes: [{}] }}", route_ports[i], routes.join(", "))
                } else {
                    String::new()
                };
                let text = format!(
                    "server_name: {name}\nlisten: \"127.0.0.1:{port}\"\n\
                     jetstream {{ store_dir: \"{store}\", max_memory_store: 256MB, max_file_store: 4GB }}\n{cluster}\n",
                    port = client_ports[i],
                    store = dir.path().join(&name).display(),
                );
                std::fs::write(&config, text).expect("write nats config");
                Node { name, client_port: client_ports[i], config, child: None }
            })
            .collect();
        let mut cluster = Self { bin: bin.to_owned(), nodes, _dir: dir };
        for i in 0..size {
            cluster.try_start_node(i)?;
        }
        Ok(cluster)
    }
    /// The client URLs of every node, comma-separated, as `relay-server --nats` takes them.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.client_port)).collect::<Vec<_>>().join(",")
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Starts node `i` again after a kill, with its store as it was.
    pub fn start_node(&mut self, i: usize) {
        if let Err(why) = self.try_start_node(i) {
            panic!("{why}");
        }
    }

    /// Starts node `i` and waits until it accepts clients; why not if it does not (its log,
    /// `n<i>.log` in the cluster's dir, says more).
    fn try_start_node(&mut self, i: usize) -> Result<(), String> {
        let log = self._dir.path().join(format!("{}.log", self.nodes[i].name));
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} is already running", node.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the nats-server log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        let child = node.child.insert(KillOnDrop(child));
        // (slow to come up when the suite's other servers load both cores)
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", node.client_port)).is_err() {
            if let Ok(Some(status)) = child.0.try_wait() {
                node.child = None;
                return Err(format!("nats-server {} exited ({status}) before listening on {}", node.name, node.client_port));
            }
            if Instant::now() > deadline {
                return Err(format!("nats-server {} never listened on {}", node.name, node.client_port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL to node `i`: no chance to flush or step down.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill_hard();
        }
    }

    pub fn store_dir(&self, i: usize) -> PathBuf {
        self._dir.path().join(&self.nodes[i].name)
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}
