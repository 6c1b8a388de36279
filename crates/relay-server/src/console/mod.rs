//! The console: humans watch and talk to their agents' groups in a browser, at `/console`.
//!
//! Server-rendered HTML (maud: compiled into the binary, escapes whatever it is given) with
//! one small script and one stylesheet, both embedded; live updates come as Server-Sent
//! Events whose data are the same HTML fragments the page is made of. No build step, no CDN.
//!
//! Safety, in layers: the Host check every route has; an Origin check (a request another
//! site's page makes is refused); a CSRF token in every form; the session in an HttpOnly,
//! SameSite=Strict cookie; a Content-Security-Policy without inline script; and every
//! text from agents escaped, with control characters shown rather than obeyed (`text`).

mod pages;
mod text;

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use relay_proto::{Event, RecipientStatus};
use serde::Deserialize;

use crate::app_state::AppState;
use crate::error::RelayError;
use crate::relay::{Audience, Human, HumanView, Session, TimelineQuery};
use crate::sse::{self, StreamParams};
use crate::store::LogEntry;

/// The session cookie's name; behind TLS with the `__Host-` prefix, which a browser keeps
/// to this exact host (no sibling subdomain can set or replace it).
const COOKIE: &str = "relay_console";
const SECURE_COOKIE: &str = "__Host-relay_console";
/// Entries on a page of the timeline.
const PAGE_ENTRIES: usize = 100;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");
const ICON: &str = include_str!("assets/icon.svg");

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(home))
        .route("/console/sign-in/{secret}", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/g/{group}", get(group))
        .route("/console/g/{group}/events", get(events))
        .route("/console/g/{group}/peers", get(peers))
        .route("/console/g/{group}/activity", get(activity))
        .route("/console/g/{group}/send", post(send))
        .route("/console/g/{group}/leave", post(leave))
        .route("/console/assets/{version}/{file}", get(asset))
        .layer(middleware::from_fn(guard))
}

/// The live stream's fragment for a log entry (see `sse`).
pub fn entry_fragment(entry: &LogEntry, me: &str) -> String {
    pages::entry(entry, me, None).into_string()
}

/// The live stream's fragment for a receipt: the mark of one recipient.
pub fn receipt_fragment(event: &Event) -> String {
    let status = RecipientStatus {
        peer: event.sender.clone(),
        state: event.state.unwrap_or(relay_proto::DeliveryState::Stored),
        detail: event.detail.clone(),
        updated_at: Some(event.time),
    };
    pages::mark(&event.id, &status).into_string()
}

/// Refuses what another site's page sends (its Origin, or the browser's word that it is
/// cross-site), and gives every answer the console's security headers.
async fn guard(request: Request, next: Next) -> Response {
    let headers = request.headers();
    // the sign-in link is opened from a terminal, a chat or a mail: no site, or another one
    let sign_in = request.method() == http::Method::GET && request.uri().path().starts_with("/console/sign-in/");
    let foreign_origin = headers.get(header::ORIGIN).is_some_and(|origin| !same_origin(origin, headers));
    let cross_site = !sign_in && headers.get("sec-fetch-site").is_some_and(|v| v == "cross-site");
    // a form post from a browser always says where it comes from
    let unsaid = request.method() == http::Method::POST && !headers.contains_key(header::ORIGIN);
    let mut response = if foreign_origin || cross_site || unsaid {
        tracing::warn!(origin = ?headers.get(header::ORIGIN), path = %request.uri().path(), "refused a console request from another site");
        (StatusCode::FORBIDDEN, "Forbidden: this request comes from another site\n").into_response()
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Whether `origin` names the host the request was sent to (`scheme://host[:port]`).
fn same_origin(origin: &HeaderValue, headers: &HeaderMap) -> bool {
    let (Ok(origin), Some(host)) = (origin.to_str(), headers.get(header::HOST).and_then(|h| h.to_str().ok())) else { return false };
    let authority = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
    authority.is_some_and(|a| a.eq_ignore_ascii_case(host))
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    let pairs = || headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';'));
    [SECURE_COOKIE, COOKIE]
        .into_iter()
        .find_map(|name| pairs().find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('=')))
        .filter(|v| !v.is_empty())
}

/// Whether the browser reached us over TLS (a proxy in front says so).
fn behind_tls(headers: &HeaderMap) -> bool {
    headers.get("x-forwarded-proto").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn session_cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    let (name, path, secure) = if secure { (SECURE_COOKIE, "/", "; Secure") } else { (COOKIE, "/console", "") };
    HeaderValue::from_str(&format!("{name}={value}; Path={path}; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"))
        .expect("a valid cookie")
}

fn html(status: StatusCode, markup: Markup) -> Response {
    (status, [(header::CACHE_CONTROL, "no-store")], axum::response::Html(markup.into_string())).into_response()
}

/// A refusal's status: what a daemon API or tool call would answer with.
fn refused(e: &RelayError) -> StatusCode {
    match e {
        RelayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        RelayError::UnknownPeer { .. } | RelayError::AmbiguousPeer { .. } => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    }
}

fn storage_failed(e: RelayError) -> Response {
    tracing::error!(error = %e, "console request failed");
    html(StatusCode::INTERNAL_SERVER_ERROR, pages::problem("Something failed", "The relay's storage failed; try again.", "/console"))
}

/// Runs a blocking relay call off the async threads.
async fn blocking<T: Send + 'static>(state: &AppState, work: impl FnOnce(&crate::Relay) -> T + Send + 'static) -> T {
    let relay = state.relay.clone();
    tokio::task::spawn_blocking(move || work(&relay)).await.expect("console calls do not panic")
}

/// The signed-in human, or the page that says how to sign in.
async fn signed_in(state: &AppState, headers: &HeaderMap) -> Result<(Human, Session), Response> {
    let Some(cookie) = cookie(headers).map(str::to_owned) else {
        return Err(html(StatusCode::UNAUTHORIZED, pages::signed_out("You are not signed in.")));
    };
    match blocking(state, move |relay| relay.console_session(&cookie)).await {
        Ok(Some(found)) => Ok(found),
        Ok(None) => Err(html(StatusCode::UNAUTHORIZED, pages::signed_out("You are not signed in here, or your session has ended."))),
        Err(e) => Err(storage_failed(e)),
    }
}

/// The human's view of a group, or a 404 when it is not theirs.
async fn view_of(state: &AppState, human: &Human, group: &str) -> Result<HumanView, Response> {
    let (human, group) = (human.clone(), group.to_owned());
    match blocking(state, move |relay| relay.human_view(&human, &group)).await {
        Ok(Some(view)) => Ok(view),
        Ok(None) | Err(RelayError::Invalid(_)) => {
            Err(html(StatusCode::NOT_FOUND, pages::problem("No such group", "None of your agents is in this group.", "/console")))
        }
        Err(e) => Err(storage_failed(e)),
    }
}

/// The signed-in human, their session and their view of `group`.
async fn in_group(state: &AppState, headers: &HeaderMap, group: &str) -> Result<(Human, Session, HumanView), Response> {
    let (human, session) = signed_in(state, headers).await?;
    let view = view_of(state, &human, group).await?;
    Ok((human, session, view))
}

fn header_of<'a>(human: &'a Human, session: &'a Session) -> pages::Header<'a> {
    pages::Header { human: &human.name, csrf: &session.csrf }
}

async fn home(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (human, session) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let h = human.clone();
    match blocking(&state, move |relay| relay.human_groups(&h)).await {
        Ok(groups) if groups.len() == 1 => Redirect::to(&format!("/console/g/{}", groups[0])).into_response(),
        Ok(groups) => html(StatusCode::OK, pages::groups_page(&header_of(&human, &session), &groups)),
        Err(e) => storage_failed(e),
    }
}

fn link_spent() -> Response {
    html(
        StatusCode::FORBIDDEN,
        pages::signed_out("This sign-in link was used already or has expired: each link works once, for a few minutes."),
    )
}

/// Opening the link uses nothing up: a link preview or a scanner that fetches it leaves it
/// working, and a page elsewhere cannot sign the browser in. The page's button does.
async fn sign_in_page(State(state): State<AppState>, Path(secret): Path<String>) -> Response {
    match blocking(&state, move |relay| relay.console_sign_in_pending(&secret)).await {
        Ok(Some(human)) => html(StatusCode::OK, pages::sign_in(&human.name)),
        Ok(None) => link_spent(),
        Err(e) => storage_failed(e),
    }
}

async fn sign_in(State(state): State<AppState>, headers: HeaderMap, Path(secret): Path<String>) -> Response {
    match blocking(&state, move |relay| relay.console_sign_in(&secret)).await {
        Ok(Some((cookie, session))) => {
            let max_age = (session.expires_at - chrono::Utc::now()).num_seconds().max(0);
            let mut response = Redirect::to("/console").into_response();
            response.headers_mut().insert(header::SET_COOKIE, session_cookie(&cookie, max_age, behind_tls(&headers)));
            response
        }
        Ok(None) => link_spent(),
        Err(e) => storage_failed(e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// Compared as hashes: the time taken says nothing about how much of the token was right.
fn csrf_ok(session: &Session, given: &str) -> bool {
    crate::secrets::token_hash(&session.csrf) == crate::secrets::token_hash(given)
}

fn csrf_refused() -> Response {
    html(StatusCode::FORBIDDEN, pages::problem("Refused", "This form is stale (or not from this page): reload and try again.", "/console"))
}

async fn sign_out(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    let (_, session) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if !csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let cookie_value = cookie(&headers).unwrap_or_default().to_owned();
    if let Err(e) = blocking(&state, move |relay| relay.console_sign_out(&cookie_value)).await {
        return storage_failed(e);
    }
    let mut response = html(StatusCode::OK, pages::signed_out("You are signed out."));
    response.headers_mut().insert(header::SET_COOKIE, session_cookie("", 0, behind_tls(&headers)));
    response
}

async fn group(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(group): Path<String>,
    Query(filters): Query<pages::Filters>,
) -> Response {
    let (human, session, view) = match in_group(&state, &headers, &group).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let query = TimelineQuery {
        text: filters.q.clone(),
        sender: filters.sender.clone(),
        since: filters.since.clone(),
        until: filters.until.clone(),
        before: filters.before,
        limit: PAGE_ENTRIES,
    };
    let (caller, v) = (state.relay.human_caller(&human), view.clone());
    let read = blocking(&state, move |relay| {
        let head = relay.store().head_seq(&v.peer.group_id)?;
        let timeline = relay.console_timeline(&v, &query);
        let peers = peers_with_activity(relay, &caller, &v.peer.group_id)?;
        let activity = relay.console_last_hour(&v)?;
        Ok::<_, RelayError>((head, timeline, peers, activity))
    })
    .await;
    let (head, timeline, peers, activity) = match read {
        Ok(read) => read,
        Err(e) => return storage_failed(e),
    };
    let (entries, more, filter_error) = match timeline {
        Ok((entries, more)) => (entries, more, None),
        Err(e @ (RelayError::BadArgument { .. } | RelayError::Invalid(_))) => (Vec::new(), false, Some(e.to_string())),
        Err(e) => return storage_failed(e),
    };
    let page = pages::GroupPage {
        header: header_of(&human, &session),
        group: &view.peer.group_id,
        me: &view.peer.peer_id,
        entries: &entries,
        more,
        head,
        peers: &peers,
        filters: &filters,
        filter_error,
        activity: &activity,
    };
    html(StatusCode::OK, pages::group_page(&page))
}

#[derive(Deserialize)]
struct After {
    /// Where the page's timeline ends: the stream starts after it. (A reconnect's
    /// `Last-Event-ID` says where it got to, and wins.)
    #[serde(default)]
    after: Option<u64>,
}

async fn events(State(state): State<AppState>, mut headers: HeaderMap, Path(group): Path<String>, Query(after): Query<After>) -> Response {
    let (_, _, mut view) = match in_group(&state, &headers, &group).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    view.cookie = cookie(&headers).map(str::to_owned);
    if let (Some(after), false) = (after.after, headers.contains_key("last-event-id")) {
        headers.insert("last-event-id", HeaderValue::from(after));
    }
    sse::open(&state, Audience::Human(Box::new(view)), &group, &headers, &StreamParams::default()).unwrap_or_else(|rejection| rejection)
}

async fn peers(State(state): State<AppState>, headers: HeaderMap, Path(group): Path<String>) -> Response {
    let (human, _, view) = match in_group(&state, &headers, &group).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let caller = state.relay.human_caller(&human);
    match blocking(&state, move |relay| peers_with_activity(relay, &caller, &view.peer.group_id)).await {
        Ok(peers) => html(StatusCode::OK, pages::peers_panel(&peers)),
        Err(e) => storage_failed(e),
    }
}

/// The group's peers, and what each online agent is doing when its daemon said.
fn peers_with_activity(relay: &crate::Relay, caller: &crate::Caller, group: &str) -> Result<Vec<pages::Peer>, RelayError> {
    let peers = relay.list_peers(caller, Some(group))?;
    let mut out = Vec::with_capacity(peers.len());
    for info in peers {
        let activity = if info.online { relay.activity(&info.peer_id)? } else { None };
        out.push(pages::Peer { info, activity });
    }
    Ok(out)
}

/// The last hour's activity panel again (the page asks now and then).
async fn activity(State(state): State<AppState>, headers: HeaderMap, Path(group): Path<String>) -> Response {
    let (_, _, view) = match in_group(&state, &headers, &group).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    match blocking(&state, move |relay| relay.console_last_hour(&view)).await {
        Ok(entries) => html(StatusCode::OK, pages::activity(&entries)),
        Err(e) => storage_failed(e),
    }
}

#[derive(Deserialize)]
struct SendForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    text: String,
    /// A peer id: a DM. Empty: the whole group.
    #[serde(default)]
    to: String,
}

/// A send from the console; answers a script with JSON, a plain form with the page again.
async fn send(State(state): State<AppState>, headers: HeaderMap, Path(group): Path<String>, Form(form): Form<SendForm>) -> Response {
    let (human, session, view) = match in_group(&state, &headers, &group).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if !csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let caller = state.relay.human_caller(&human);
    let group_id = view.peer.group_id.clone();
    let sent = blocking(&state, move |relay| {
        let text = form.text.replace("\r\n", "\n");
        match form.to.trim() {
            "" => relay.send_message(&caller, &text, Some(&group_id), None),
            to => relay.send_dm(&caller, Some(&group_id), to, &text, None),
        }
    })
    .await;
    let wants_json = headers.get(header::ACCEPT).is_some_and(|a| a.to_str().is_ok_and(|a| a.contains("application/json")));
    match sent {
        Ok(sent) if wants_json => axum::Json(sent).into_response(),
        Ok(_) => Redirect::to(&format!("/console/g/{group}")).into_response(),
        Err(RelayError::Storage(e)) => storage_failed(RelayError::Storage(e)),
        Err(e) if wants_json => (refused(&e), axum::Json(serde_json::json!({"error": e.to_string()}))).into_response(),
        Err(e) => html(refused(&e), pages::problem("Not sent", &e.to_string(), &format!("/console/g/{group}"))),
    }
}

async fn leave(State(state): State<AppState>, headers: HeaderMap, Path(group): Path<String>, Form(form): Form<CsrfForm>) -> Response {
    let (human, session) = match signed_in(&state, &headers).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    if !csrf_ok(&session, &form.csrf) {
        return csrf_refused();
    }
    let caller = state.relay.human_caller(&human);
    match blocking(&state, move |relay| relay.leave_group(&caller, &group)).await {
        Ok(_) | Err(RelayError::NotMember { .. } | RelayError::NotRegistered | RelayError::Invalid(_)) => {
            Redirect::to("/console").into_response()
        }
        Err(e) => storage_failed(e),
    }
}

async fn asset(Path((version, file)): Path<(String, String)>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "console.css" => (STYLE, "text/css; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    // an older or newer version's path gets today's file, but is not cached for long
    let cache = if version == pages::ASSET_VERSION { "public, max-age=31536000, immutable" } else { "no-cache" };
    ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, cache)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_the_host_they_were_sent_to() {
        let headers = |host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            h
        };
        let o = |s: &'static str| HeaderValue::from_static(s);
        assert!(same_origin(&o("http://127.0.0.1:8765"), &headers("127.0.0.1:8765")));
        assert!(same_origin(&o("https://Relay.Example"), &headers("relay.example")));
        assert!(!same_origin(&o("http://evil.example"), &headers("relay.example")));
        assert!(!same_origin(&o("http://127.0.0.1:9999"), &headers("127.0.0.1:8765")));
        assert!(!same_origin(&o("null"), &headers("relay.example")));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; relay_console=abc; b=2"));
        assert_eq!(cookie(&h), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("relay_console_x=1; relay_console="));
        assert_eq!(cookie(&h), None);
        h.insert(header::COOKIE, HeaderValue::from_static("relay_console=plain; __Host-relay_console=tls"));
        assert_eq!(cookie(&h), Some("tls"));
        let set = session_cookie("v", 60, true);
        let set = set.to_str().unwrap();
        assert!(set.starts_with("__Host-relay_console=v;") && set.contains("Path=/;"), "{set}");
        for part in ["HttpOnly", "SameSite=Strict", "Secure", "Max-Age=60"] {
            assert!(set.contains(part), "{set}");
        }
        let plain = session_cookie("v", 60, false);
        assert!(plain.to_str().unwrap().starts_with("relay_console=v; Path=/console;") && !plain.to_str().unwrap().contains("Secure"));
    }
}
