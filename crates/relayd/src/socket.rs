//! The control socket, with the hygiene a per-user daemon needs: a private directory
//! (0700), a private socket (0600), one daemon per socket (a live one is detected by
//! connecting; a stale file is replaced), peers of another user refused, the file removed
//! on shutdown.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::{GenericFilePath, ListenerOptions};
use thiserror::Error;

use relay_local::client::connect;
use relay_local::paths::{MAX_SOCKET_PATH, euid};

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("socket path {path} is {len} bytes; the limit is {max} (macOS); choose a shorter --socket")]
    PathTooLong { path: PathBuf, len: usize, max: usize },
    #[error("another relayd is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{dir} is not private to this user ({why}); refusing to put the socket there")]
    UnsafeDir { dir: PathBuf, why: String },
    #[error("cannot set up the socket at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SocketError + '_ {
    move |source| SocketError::Io { path: path.to_owned(), source }
}

/// Makes `dir` if needed and checks it is ours alone.
pub fn private_dir(dir: &Path) -> Result<(), SocketError> {
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    let meta = std::fs::metadata(dir).map_err(io_err(dir))?;
    if meta.uid() != euid() {
        return Err(SocketError::UnsafeDir { dir: dir.to_owned(), why: format!("owned by uid {}", meta.uid()) });
    }
    if meta.mode() & 0o077 != 0 {
        // ours, so tighten it rather than refuse
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Binds the control socket at `path`.
pub async fn bind(path: &Path) -> Result<Listener, SocketError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(SocketError::PathTooLong { path: path.to_owned(), len, max: MAX_SOCKET_PATH });
    }
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    if path.exists() {
        if connect(path).await.is_ok() {
            return Err(SocketError::AlreadyRunning(path.to_owned()));
        }
        tracing::info!(path = %path.display(), "replacing a stale socket");
        std::fs::remove_file(path).map_err(io_err(path))?;
    }
    let name = path.to_fs_name::<GenericFilePath>().map_err(io_err(path))?;
    let options = ListenerOptions::new().name(name).reclaim_name(true);
    #[cfg(target_os = "linux")]
    let options = {
        use interprocess::os::unix::local_socket::ListenerOptionsExt;
        options.mode(0o600) // set before bind: no window with a wider mode
    };
    let listener = options.create_tokio().map_err(io_err(path))?;
    // elsewhere (macOS rejects the above) the private directory covers the window
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    Ok(listener)
}

/// Only the daemon's own user may use it.
pub fn peer_allowed(peer_euid: Option<u32>, own_euid: u32) -> bool {
    peer_euid == Some(own_euid)
}

/// The connecting process's effective user id.
pub fn peer_euid(stream: &Stream) -> Option<u32> {
    stream.peer_creds().ok().and_then(|c| c.euid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_same_user_is_allowed() {
        assert!(peer_allowed(Some(1000), 1000));
        assert!(!peer_allowed(Some(0), 1000));
        assert!(!peer_allowed(Some(1001), 1000));
        assert!(!peer_allowed(None, 1000), "unknown credentials are refused");
    }

    #[tokio::test]
    async fn binds_privately_detects_a_live_daemon_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock_dir = dir.path().join("run");
        let path = sock_dir.join("relayd.sock");
        let listener = bind(&path).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sock_dir), 0o700);
        assert_eq!(mode(&path), 0o600);

        // a second daemon on the same path is refused while the first lives
        assert!(matches!(bind(&path).await, Err(SocketError::AlreadyRunning(_))));
        let client = connect(&path).await.unwrap();
        let server_side = listener.accept().await.unwrap();
        assert_eq!(peer_euid(&server_side), Some(euid()));
        drop((client, server_side));

        // dropping the listener removes the file
        drop(listener);
        assert!(!path.exists());

        // a stale socket file (nobody listening) is replaced
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale); // std leaves the file behind
        assert!(path.exists());
        let again = bind(&path).await.unwrap();
        drop(again);
    }

    #[tokio::test]
    async fn refuses_long_paths_and_loosens_no_directory() {
        let long = PathBuf::from("/tmp").join("x".repeat(120)).join("s.sock");
        assert!(matches!(bind(&long).await, Err(SocketError::PathTooLong { .. })));

        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(std::fs::metadata(&open).unwrap().permissions().mode() & 0o777, 0o700);
    }
}
