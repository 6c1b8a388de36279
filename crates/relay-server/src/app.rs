//! The HTTP surface: `/mcp`, the event streams, `/healthz`, `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::app_state::AppState;
use crate::config::Config;
use crate::direct_calls::{self, DirectCalls};
use crate::front::ClientAddr;
use crate::mcp::RelayTools;
use crate::relay::Relay;
use crate::sessions::BoundedSessions;
use crate::{console, daemon_api, sse};

pub fn router(relay: Arc<Relay>, config: &Config, shutdown: CancellationToken) -> Router {
    let mut local = LocalSessionManager::default();
    local.session_config.keep_alive = Some(Duration::from_secs(config.session_idle_secs));
    let sessions = BoundedSessions::new(local, config.max_sessions, Duration::from_secs(config.unused_session_secs), relay.clone());
    let mcp_config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown.child_token())
        .with_sse_keep_alive(Some(Duration::from_secs(config.heartbeat_secs)))
        .with_max_request_body_bytes(config.max_request_bytes)
        // stateless replies as plain JSON: cheaper than a one-event SSE stream
        .with_json_response(true)
        // one Host check for every route, below
        .disable_allowed_hosts();
    let direct = config.direct_tool_calls.then(|| DirectCalls::new(relay.clone(), &mcp_config)).flatten().map(Arc::new);
    let tools_relay = relay.clone();
    let mcp = Arc::new(StreamableHttpService::new(move || Ok(RelayTools::new(tools_relay.clone())), Arc::new(sessions), mcp_config));
    let mcp = tower::service_fn(move |request: Request| {
        let (mcp, direct) = (mcp.clone(), direct.clone());
        async move { Ok::<_, Infallible>(direct_calls::serve_mcp(direct.as_deref(), &mcp, request).await) }
    });

    let state = AppState {
        relay,
        shutdown,
        heartbeat: Duration::from_secs(config.heartbeat_secs),
        stream_write_interval: Duration::from_millis(config.stream_write_interval_ms),
    };
    let hosts = Arc::new(AllowedHosts::new(&config.allowed_hosts));
    let mut router = Router::new()
        .nest_service("/mcp", mcp)
        .route("/notifications/{group_id}/{peer_id}", get(sse::notifications))
        .route("/v1/daemons", post(daemon_api::create_daemon))
        .route("/v1/peers", post(daemon_api::register_peer))
        .route("/v1/peers/{peer_id}", delete(daemon_api::remove_peer))
        .route("/v1/peers/{peer_id}/peers", get(daemon_api::peer_list_peers))
        .route("/v1/peers/{peer_id}/messages", post(daemon_api::peer_send))
        .route("/v1/peers/{peer_id}/messages/{message_id}", get(daemon_api::peer_message_status))
        .route("/v1/peers/{peer_id}/activity", post(daemon_api::peer_activity))
        .route("/v1/groups/{group_id}/events", get(daemon_api::group_events))
        .route("/v1/receipts", post(daemon_api::report_receipts))
        .route("/v1/console/sign-in", post(daemon_api::console_sign_in))
        .route("/v1/console/sign-out-everywhere", post(daemon_api::console_sign_out_everywhere))
        .route("/v1/console/pairings", post(daemon_api::console_pairing))
        .route("/v1/console/join", post(daemon_api::console_join))
        .merge(console::routes())
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(hosts, check_host));
    // (a layer only where it has work: every request would pass through it)
    if config.trust_forwarded_for {
        router = router.layer(middleware::from_fn(client_behind_proxy));
    }
    // after the layers: load balancers probe by IP
    router.route("/healthz", get(healthz)).with_state(state)
}

/// "ok" while this node can serve; 503 and why when its store cannot (a cluster node that
/// lost JetStream), so a load balancer sends clients elsewhere.
async fn healthz(State(state): State<AppState>) -> Response {
    match state.relay.store().unhealthy() {
        None => "ok\n".into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {why}\n")).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.relay.metrics.render()).into_response()
}

/// Behind a reverse proxy every connection comes from the proxy: with `trust_forwarded_for`
/// the client is the address the proxy appended last to `X-Forwarded-For` (earlier entries
/// are the client's own word). Without one that parses, the client is unknown (0.0.0.0), never
/// the proxy's own, often loopback, address.
async fn client_behind_proxy(mut request: Request, next: Next) -> Response {
    let last = request.headers().get_all("x-forwarded-for").iter().next_back().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let ip = last.as_deref().and_then(|v| v.rsplit(',').next()).and_then(|entry| entry.trim().parse().ok());
    request.extensions_mut().insert(ClientAddr(ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into())));
    next.run(request).await
}

/// The Host headers a browser on another site cannot forge into a request to us.
pub struct AllowedHosts {
    any: bool,
    /// (host, port); no port matches any port.
    entries: Vec<(String, Option<u16>)>,
}

impl AllowedHosts {
    pub fn new(list: &[String]) -> Self {
        let any = list.iter().any(|h| h.trim() == "*");
        let entries = list.iter().filter_map(|h| split_host(h.trim())).map(|(h, p)| (h.to_ascii_lowercase(), p)).collect();
        Self { any, entries }
    }

    pub fn allows(&self, host_header: &str) -> bool {
        if self.any {
            return true;
        }
        let Some((host, port)) = split_host(host_header.trim()) else { return false };
        self.entries.iter().any(|(h, p)| h.eq_ignore_ascii_case(&host) && (p.is_none() || *p == port))
    }
}

/// `example.com`, `example.com:80`, `[::1]:80`, `::1` into host and port.
fn split_host(value: &str) -> Option<(String, Option<u16>)> {
    if value.is_empty() {
        return None;
    }
    if let Some(rest) = value.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    if value.matches(':').count() > 1 {
        return Some((value.to_owned(), None)); // a bare IPv6 address
    }
    match value.split_once(':') {
        Some((host, port)) => Some((host.to_owned(), Some(port.parse().ok()?))),
        None => Some((value.to_owned(), None)),
    }
}

async fn check_host(State(hosts): State<Arc<AllowedHosts>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    match host {
        Some(h) if hosts.allows(&h) => next.run(request).await,
        other => {
            tracing::warn!(host = ?other, "refused a request for a host not in --allowed-host");
            (
                StatusCode::FORBIDDEN,
                "Forbidden: this Host is not allowed (DNS-rebinding protection); start relay-server with --allowed-host NAME\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_matching() {
        let hosts = AllowedHosts::new(&["localhost".into(), "127.0.0.1".into(), "::1".into(), "relay.example:443".into()]);
        for ok in ["localhost", "LOCALHOST:8765", "127.0.0.1:1", "[::1]:8765", "::1", "relay.example:443"] {
            assert!(hosts.allows(ok), "{ok}");
        }
        for bad in ["evil.example", "relay.example", "relay.example:80", "127.0.0.2", "localhost.evil.example:80", "", "[::1"] {
            assert!(!hosts.allows(bad), "{bad}");
        }
        assert!(AllowedHosts::new(&["*".into()]).allows("anything:1"));
    }
}
