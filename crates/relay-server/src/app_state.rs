//! What every HTTP handler shares, apart from the router that hands it to them.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::relay::Relay;

#[derive(Clone)]
pub struct AppState {
    pub relay: Arc<Relay>,
    pub shutdown: CancellationToken,
    /// How often event streams send a heartbeat (and announce it to relayd).
    pub heartbeat: Duration,
    /// An event stream writes at most once per this long, the events meanwhile together.
    pub stream_write_interval: Duration,
}
