//! A real reverse proxy (HAProxy, from Debian) in front of several relay-server nodes, so
//! clients do not know which node they reach. It checks `/healthz`, retries a connection
//! a dead node refuses on another, streams `text/event-stream` without buffering, and keeps
//! an MCP session (older protocol versions) on the node that made it.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{KillOnDrop, require};

pub fn haproxy(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
    require(test, "haproxy", dirs.into_iter().map(|d| d.join("haproxy")).find(|p| p.is_file()))
}

pub struct Proxy {
    pub addr: SocketAddr,
    child: KillOnDrop,
    dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts HAProxy on a free 127.0.0.1 port, balancing over `backends`.
    pub fn start(test: &str, backends: &[SocketAddr]) -> Option<Self> {
        let bin = haproxy(test)?;
        let dir = tempfile::tempdir().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let servers: String = backends.iter().enumerate().map(|(i, addr)| format!("    server node{i} {addr} check\n")).collect();
        let config = format!(
            "global\n    maxconn 4096\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 1h\n    timeout server 1h\n    timeout tunnel 1h\n\
             \x20   option redispatch\n    retries 3\n\
             frontend relay\n    bind 127.0.0.1:{port}\n    default_backend nodes\n\
             backend nodes\n    balance roundrobin\n    option httpchk GET /healthz\n    http-check expect status 200\n\
             \x20   stick-table type string len 128 size 100k expire 1h\n\
             \x20   stick match req.hdr(mcp-session-id)\n    stick store-response res.hdr(mcp-session-id)\n\
             \x20   default-server inter 300ms fall 2 rise 2\n{servers}"
        );
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, config).expect("write haproxy.cfg");
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("haproxy's log file");
        let child = Command::new(bin)
            .arg("-f")
            .arg(&config_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let child = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy never listened on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { addr: ([127, 0, 0, 1], port).into(), child, dir })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Proxy {
    /// A failing test shows what HAProxy said, and whether it was still running.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let exited = self.child.0.try_wait().ok().flatten();
            let log = std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default();
            eprintln!("haproxy on {}: {}; its log:\n{log}", self.addr, exited.map_or("still running".into(), |s| format!("exited, {s}")));
        }
    }
}
