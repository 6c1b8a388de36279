//! Reaching relayd, starting it when it is not running.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use relay_local::client::Client;
use relay_proto::local::{Reply, Request};

pub const CLIENT_NAME: &str = concat!("relay ", env!("CARGO_PKG_VERSION"));

pub fn socket_path(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf).unwrap_or_else(relay_local::paths::default_socket)
}

/// A sibling binary of this one (installed together), else one on PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Connects to relayd, starting it first if needed: the systemd user unit when it is
/// installed, else a detached `relayd` of our own.
pub async fn connect_or_start(socket: &Path) -> Result<Client> {
    if let Ok(client) = Client::connect(socket, CLIENT_NAME).await {
        return Ok(client);
    }
    let started_by = if systemd_unit_available() {
        let ok = Command::new("systemctl").args(["--user", "start", "relayd"]).status().is_ok_and(|s| s.success());
        if ok { "systemctl --user start relayd" } else { spawn_detached(socket)? }
    } else {
        spawn_detached(socket)?
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect(socket, CLIENT_NAME).await {
            Ok(client) => {
                eprintln!("relay: started relayd ({started_by})");
                return Ok(client);
            }
            Err(e) if Instant::now() > deadline => {
                bail!("started relayd ({started_by}) but cannot reach it at {}: {e}", socket.display())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn systemd_unit_available() -> bool {
    Command::new("systemctl")
        .args(["--user", "cat", "relayd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts relayd in its own session, detached from this terminal, logging to a file.
fn spawn_detached(socket: &Path) -> Result<&'static str> {
    use std::os::unix::process::CommandExt;
    let log_dir = relay_local::paths::default_state_dir();
    std::fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_dir.join("relayd.log"))?;
    let mut cmd = Command::new(sibling_binary("relayd"));
    cmd.arg("--socket").arg(socket).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    // SAFETY: setsid is async-signal-safe and touches nothing of the parent's.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("cannot start relayd (is it installed beside relay?)")?;
    Ok("in the background; log in ~/.local/state/relay/relayd/relayd.log")
}

/// One request, one reply; an error reply becomes an error.
pub async fn request(client: &mut Client, request: &Request) -> Result<Reply> {
    match client.request(request).await? {
        Reply::Error { message, .. } => bail!("{message}"),
        reply => Ok(reply),
    }
}
