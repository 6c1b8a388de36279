//! Plumbing every relay binary shares.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use tokio_util::sync::CancellationToken;

/// Logs to stderr (stdout may carry a protocol): `RUST_LOG` if set, else info, debug or
/// trace by the number of `-v`. Colours only on a terminal. For daemons.
pub fn init_tracing(verbose: u8) {
    init_tracing_from(["info", "debug", "trace"], verbose);
}

/// The same, starting at warnings: for commands people run, whose output is their own.
pub fn init_tracing_quiet(verbose: u8) {
    init_tracing_from(["warn", "debug", "trace"], verbose);
}

fn init_tracing_from(levels: [&str; 3], verbose: u8) {
    use std::io::IsTerminal;
    let filter = env_filter(levels[usize::from(verbose.min(2))]);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Logs to a file (for programs whose terminal is their user interface): `RUST_LOG` if
/// set, else info. The file is 0600, appended to, and started afresh past `max_len` bytes.
pub fn init_tracing_to_file(path: &Path, max_len: u64) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let long = std::fs::metadata(path).is_ok_and(|m| m.len() > max_len);
    let file = std::fs::OpenOptions::new().create(true).append(!long).write(true).truncate(long).mode(0o600).open(path)?;
    let filter = env_filter("info");
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::sync::Mutex::new(file)).with_ansi(false).init();
    Ok(())
}

/// `RUST_LOG` if set, else `level`; rmcp only from warnings up unless asked for debug
/// (it logs each MCP session's start and end at info: lines per tool call on a busy server).
fn env_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let rmcp = if matches!(level, "info" | "warn") { ",rmcp=warn" } else { "" };
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| format!("{level}{rmcp}").into())
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    shutdown.cancel();
    tracing::info!("shutting down");
}

/// Replaces `path` with `bytes` so that readers see the old file or the new one, never a
/// mix: a temp file beside it, flushed to disk, renamed over. `mode` applies to the new file.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_replace_whole_files_with_the_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.json");
        write_atomically(&path, b"one", 0o600).unwrap();
        write_atomically(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temp file was left behind");
        assert!(write_atomically(&dir.path().join("missing/f"), b"x", 0o600).is_err());
    }
}
