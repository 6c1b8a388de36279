//! relayd: one per user per machine. It registers local tmux panes with relay-servers,
//! keeps one upstream event stream per (server, group), fans events out to the panes'
//! subscribers over a Unix socket, and raises desktop notifications for DMs.
//!
//! [`run`] is the whole daemon; the binary and the tests both call it.

pub mod args;
pub mod control;
pub mod daemon;
pub mod receipts;
pub mod server_api;
pub mod socket;
pub mod state;
pub mod upstream;

use std::sync::Arc;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

use daemon::Daemon;
pub use relay_local::config::Config;
use relay_local::notify;
use relay_local::notify::Notifier;
use state::State;

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error("{0}")]
    State(String),
    /// Something that should not happen did; relayd stops so its service manager restarts it.
    #[error("{0}")]
    Internal(String),
}

/// Runs the daemon until `shutdown` is cancelled (or a client asks it to stop).
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let notifier: Arc<dyn Notifier> = if config.notifications { Arc::new(notify::Desktop::default()) } else { Arc::new(notify::Silent) };
    run_with(config, notifier, shutdown).await
}

/// [`run`] with the notifier chosen by the caller.
pub async fn run_with(config: Config, notifier: Arc<dyn Notifier>, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let socket_path = config.socket_path();
    let state_dir = config.state_dir();
    socket::private_dir(&state_dir)?;
    let state = State::load(&state_dir).map_err(|e| DaemonError::State(e.to_string()))?;
    let listener = socket::bind(&socket_path).await?;
    let daemon = Daemon::new(config, state, socket_path.clone(), state_dir, notifier, shutdown.clone());
    daemon.resume();
    let saver = tokio::spawn(daemon.clone().save_in_background());
    tokio::spawn(daemon.outbox().run(daemon.receipt_sender()));
    let mut follower = tokio::spawn(daemon.clone().follow_upstreams());
    tracing::info!(socket = %socket_path.display(), "relayd listening");
    let mut outcome = Ok(());
    loop {
        use interprocess::local_socket::traits::tokio::Listener as _;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // every event passes through it: without it relayd would look alive and do nothing
            ended = &mut follower => {
                tracing::error!(?ended, "relayd stopped applying what its upstream streams report; stopping");
                outcome = Err(DaemonError::Internal("the task applying upstream reports ended".into()));
                shutdown.cancel();
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok(stream) => { tokio::spawn(control::serve(daemon.clone(), stream)); }
                Err(e) => tracing::warn!(error = %e, "accepting a control connection failed"),
            },
        }
    }
    drop(listener); // removes the socket file
    let _ = saver.await; // writes the final state
    tracing::info!("relayd stopped");
    outcome
}
