//! Plumbing every relay binary shares.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal()).init();
}

/// Logs to a file (for programs whose terminal is their user interface): `RUST_LOG` if
/// set, else info. The file is 0600 and appended to; see [`CappedLog`] for its size.
pub fn init_tracing_to_file(path: &Path, max_len: u64) -> std::io::Result<()> {
    let log = CappedLog::open(path, max_len)?;
    let filter = env_filter("info");
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::sync::Mutex::new(log)).with_ansi(false).init();
    Ok(())
}

/// A log file that never grows far past `max_len` bytes: when a write would take it past,
/// the file becomes `<name>.old` (replacing the one before) and a new one starts. A sidebar
/// lives as long as its tmux pane, for weeks if need be, and logs every delivery.
pub struct CappedLog {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    max_len: u64,
}

impl CappedLog {
    pub fn open(path: &Path, max_len: u64) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = Self::append_to(path)?;
        let len = file.metadata()?.len();
        let mut log = Self { path: path.to_owned(), file, len, max_len };
        if log.len > max_len {
            log.start_afresh()?;
        }
        Ok(log)
    }

    fn append_to(path: &Path) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)
    }

    /// Moves the file aside and opens a new one; if it cannot be moved (someone deleted it,
    /// say), a new one replaces it. Either way the count starts again, so a failure here is
    /// not retried on every line.
    fn start_afresh(&mut self) -> std::io::Result<()> {
        self.len = 0;
        let mut old = self.path.clone().into_os_string();
        old.push(".old");
        self.file = match std::fs::rename(&self.path, old) {
            Ok(()) => Self::append_to(&self.path)?,
            Err(_) => std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&self.path)?,
        };
        Ok(())
    }
}

impl Write for CappedLog {
    /// Writes `buf` whole, to one file: a line is never split between the two.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len > 0 && self.len + buf.len() as u64 > self.max_len {
            self.start_afresh()?;
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
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

/// This machine's host name ("localhost" when it has none).
pub fn system_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if ok && !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
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

    #[test]
    fn a_capped_log_starts_afresh_and_keeps_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/pane.log");
        let old = dir.path().join("logs/pane.log.old");
        let mut log = CappedLog::open(&path, 10).unwrap();
        log.write_all(b"one\n").unwrap();
        log.write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
        log.write_all(b"three\n").unwrap(); // 14 bytes > 10
        assert_eq!(std::fs::read(&path).unwrap(), b"three\n");
        assert_eq!(std::fs::read(&old).unwrap(), b"one\ntwo\n");
        log.write_all(b"iv\n").unwrap();
        log.write_all(b"a line longer than the cap\n").unwrap();
        assert_eq!(std::fs::read(&old).unwrap(), b"three\niv\n", "the older one is replaced");
        assert_eq!(std::fs::read(&path).unwrap(), b"a line longer than the cap\n", "a long line is written whole");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        drop(log);

        // reopened: appends below the cap, starts afresh above it
        let mut log = CappedLog::open(&path, 1000).unwrap();
        log.write_all(b"five\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a line longer than the cap\nfive\n");
        drop(log);
        let mut log = CappedLog::open(&path, 8).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        assert_eq!(std::fs::read(&old).unwrap(), b"a line longer than the cap\nfive\n");

        // deleted under it: the next start afresh makes a new file rather than failing
        log.write_all(b"six\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        log.write_all(b"seven\n").unwrap();
        log.write_all(b"8\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"seven\n8\n");
    }
}
