//! Where relayd keeps its socket and its state.

use std::path::{Path, PathBuf};

/// The longest Unix socket path every platform takes: `sun_path` is 104 bytes on macOS,
/// NUL included.
pub const MAX_SOCKET_PATH: usize = 103;
pub const SOCKET_NAME: &str = "relayd.sock";

pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The per-user runtime directory: `$XDG_RUNTIME_DIR/relay`, else a private directory in
/// the temp dir named after the user id (as zellij and tmux do).
pub fn runtime_dir() -> PathBuf {
    match directories::BaseDirs::new().and_then(|d| d.runtime_dir().map(Path::to_path_buf)) {
        Some(dir) => dir.join("relay"),
        None => std::env::temp_dir().join(format!("relay-{}", euid())),
    }
}

/// The default socket path, kept under the macOS limit by falling back to `/tmp`.
pub fn default_socket() -> PathBuf {
    let preferred = runtime_dir().join(SOCKET_NAME);
    if preferred.as_os_str().len() <= MAX_SOCKET_PATH {
        preferred
    } else {
        PathBuf::from(format!("/tmp/relay-{}", euid())).join(SOCKET_NAME)
    }
}

/// Where attachments, tokens and stream positions persist.
pub fn default_state_dir() -> PathBuf {
    match directories::ProjectDirs::from("", "", "relay") {
        Some(dirs) => dirs.state_dir().unwrap_or_else(|| dirs.data_local_dir()).join("relayd"),
        None => std::env::temp_dir().join(format!("relay-{}", euid())).join("state"),
    }
}

pub fn default_config_file() -> Option<PathBuf> {
    directories::ProjectDirs::from("", "", "relay").map(|d| d.config_dir().join("config.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_socket_fits_every_platform() {
        let path = default_socket();
        assert!(path.as_os_str().len() <= MAX_SOCKET_PATH, "{}", path.display());
        assert!(path.ends_with(SOCKET_NAME));
    }
}
