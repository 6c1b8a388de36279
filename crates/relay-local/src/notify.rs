//! Desktop notifications for DMs, behind a trait so the daemon's logic is testable.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// One notification to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub summary: String,
    pub body: String,
}

pub trait Notifier: Send + Sync + 'static {
    /// Shows the notice without blocking the caller; failures are the notifier's to handle.
    fn notify(&self, notice: Notice);
}

/// Shows nothing (notifications turned off).
pub struct Silent;

impl Notifier for Silent {
    fn notify(&self, _notice: Notice) {}
}

/// The desktop's notification service (D-Bus on Linux), through notify-rust. Each notice
/// is shown from a blocking thread with a timeout; with no session bus or no notification
/// service the first failure is logged as a warning and later ones quietly.
pub struct Desktop {
    warned: Arc<AtomicBool>,
    timeout: Duration,
}

impl Default for Desktop {
    fn default() -> Self {
        Self { warned: Arc::default(), timeout: Duration::from_secs(5) }
    }
}

impl Notifier for Desktop {
    fn notify(&self, notice: Notice) {
        let (warned, timeout) = (self.warned.clone(), self.timeout);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            let shown = tokio::task::spawn_blocking(move || {
                notify_rust::Notification::new()
                    .appname("relay")
                    .summary(&notice.summary)
                    .body(&notice.body)
                    .timeout(notify_rust::Timeout::Milliseconds(10_000))
                    .show()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            let outcome = match tokio::time::timeout(timeout, shown).await {
                Ok(Ok(result)) => result,
                Ok(Err(join)) => Err(join.to_string()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            if let Err(e) = outcome {
                if !warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "desktop notifications are unavailable (no session bus or notification service?); going on without them");
                } else {
                    tracing::debug!(error = %e, "desktop notification failed");
                }
            }
        });
    }
}
