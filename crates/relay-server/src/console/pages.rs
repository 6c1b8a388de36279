//! The console's HTML, rendered on the server with maud (which escapes every value it is
//! given). The same fragments go into the first page and onto the live stream, so a
//! message looks the same whichever way it arrived.

use std::collections::BTreeMap;

use maud::{DOCTYPE, Markup, html};
use relay_proto::{DeliveryState, EventKind, PeerInfo, PeerKind, RecipientStatus};

use super::text::{fold, visible};
use crate::store::LogEntry;

/// The asset paths carry the build's version, so a browser never runs an older script
/// against a newer page (they are cached for a long time).
pub const ASSET_VERSION: &str = env!("CARGO_PKG_VERSION");

fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (visible(title)) " · relay console" }
                link rel="stylesheet" href={ "/console/assets/" (ASSET_VERSION) "/console.css" };
                link rel="icon" href={ "/console/assets/" (ASSET_VERSION) "/icon.svg" } type="image/svg+xml";
                script src={ "/console/assets/" (ASSET_VERSION) "/console.js" } defer {}
            }
            body { (body) }
        }
    }
}

/// A page for someone not (or no longer) signed in.
pub fn signed_out(why: &str) -> Markup {
    layout(
        "Sign in",
        html! {
            main.narrow {
                h1 { "relay console" }
                p.notice { (why) }
                p { "On a machine where relayd runs for you, run " code { "relay console" } " to get a sign-in link." }
            }
        },
    )
}

/// The sign-in link's page: one button, which uses the link up.
pub fn sign_in(human: &str) -> Markup {
    layout(
        "Sign in",
        html! {
            main.narrow {
                h1 { "relay console" }
                form method="post" {
                    p { "Sign in as " bdi { (visible(human)) } " in this browser?" }
                    button #sign-in type="submit" { "Sign in" }
                }
                p.muted { "The link works once, for a few minutes. If you did not ask for it, close this page." }
            }
        },
    )
}

pub struct Header<'a> {
    pub human: &'a str,
    pub csrf: &'a str,
}

fn header(h: &Header, group: Option<&str>) -> Markup {
    html! {
        header.top {
            a.brand href="/console" { "relay" }
            @if let Some(g) = group { span.crumb { "/ " bdi { (visible(g)) } } }
            span.spacer {}
            span.who { "signed in as " bdi { (visible(h.human)) } }
            form.inline method="post" action="/console/sign-out" {
                input type="hidden" name="csrf" value=(h.csrf);
                button type="submit" { "Sign out" }
            }
        }
    }
}

pub fn groups_page(h: &Header, groups: &[String]) -> Markup {
    layout(
        "Groups",
        html! {
            (header(h, None))
            main.narrow {
                h1 { "Your groups" }
                @if groups.is_empty() {
                    p.notice { "None yet: attach an agent to a group (" code { "relay attach %3 --group NAME" } ") and it shows here." }
                }
                ul.groups {
                    @for g in groups { li { a href={ "/console/g/" (g) } { (visible(g)) } } }
                }
            }
        },
    )
}

/// What the timeline shows, as the page's filter form holds it.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Filters {
    /// A regular expression the text must match.
    #[serde(default)]
    pub q: Option<String>,
    /// A sender's id or name.
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    /// Only entries before this sequence number (scrolling back).
    #[serde(default)]
    pub before: Option<u64>,
}

impl Filters {
    pub fn any(&self) -> bool {
        [&self.q, &self.sender, &self.since, &self.until].iter().any(|f| f.as_deref().is_some_and(|v| !v.trim().is_empty()))
            || self.before.is_some()
    }
}

pub struct GroupPage<'a> {
    pub header: Header<'a>,
    pub group: &'a str,
    /// The human's own peer in the group.
    pub me: &'a str,
    pub entries: &'a [(LogEntry, Option<Vec<RecipientStatus>>)],
    /// Older entries match the filters too.
    pub more: bool,
    /// The log's head when the page was read: the live stream goes on from here.
    pub head: u64,
    pub peers: &'a [Peer],
    pub filters: &'a Filters,
    pub filter_error: Option<String>,
    pub activity: &'a [LogEntry],
}

pub fn group_page(p: &GroupPage) -> Markup {
    let live = !p.filters.any();
    layout(
        p.group,
        html! {
            (header(&p.header, Some(p.group)))
            main.group data-group=(p.group) data-head=(p.head) data-live=(live) data-me=(p.me) {
                section.timeline-pane {
                    form.filters method="get" {
                        input type="search" name="q" placeholder="text or regex" value=[p.filters.q.as_deref()];
                        input type="text" name="sender" placeholder="sender" value=[p.filters.sender.as_deref()];
                        input type="text" name="since" placeholder="since (2026-12-06T10:00)" value=[p.filters.since.as_deref()];
                        input type="text" name="until" placeholder="until" value=[p.filters.until.as_deref()];
                        button type="submit" { "Filter" }
                        @if !live { a href={ "/console/g/" (p.group) } { "live view" } }
                    }
                    @if let Some(e) = &p.filter_error { p.error { (e) } }
                    @if p.more {
                        @if let Some(oldest) = p.entries.first() {
                            a.older href=(older_link(p.group, p.filters, oldest.0.seq)) { "older messages" }
                        }
                    }
                    ol #timeline {
                        @for (e, marks) in p.entries { (entry(e, p.me, marks.as_deref())) }
                    }
                    p #stream-state.muted {}
                    form #compose method="post" action={ "/console/g/" (p.group) "/send" } {
                        input type="hidden" name="csrf" value=(p.header.csrf);
                        select name="to" aria-label="to" {
                            option value="" { "everyone in " (visible(p.group)) }
                            @for peer in p.peers.iter().map(|peer| &peer.info).filter(|peer| peer.peer_id != p.me) {
                                option value=(peer.peer_id) { "DM " (visible(&peer.display_name)) }
                            }
                        }
                        textarea name="text" rows="3" required placeholder="Write to your agents…" {}
                        button type="submit" { "Send" }
                        p #compose-error.error {}
                    }
                }
                aside.side {
                    section #peers { (peers_panel(p.peers)) }
                    section #activity { (activity(p.activity)) }
                    form method="post" action={ "/console/g/" (p.group) "/leave" } {
                        input type="hidden" name="csrf" value=(p.header.csrf);
                        button.quiet type="submit" { "Leave this group" }
                    }
                }
            }
        },
    )
}

fn older_link(group: &str, f: &Filters, before: u64) -> String {
    let mut query = vec![("before".to_owned(), before.to_string())];
    for (k, v) in [("q", &f.q), ("sender", &f.sender), ("since", &f.since), ("until", &f.until)] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            query.push((k.to_owned(), v.to_owned()));
        }
    }
    let encoded: Vec<String> = query.iter().map(|(k, v)| format!("{k}={}", url_encode(v))).collect();
    format!("/console/g/{group}?{}", encoded.join("&"))
}

fn url_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One entry of the timeline: a message (with its marks when it is the human's own) or a
/// peer coming or going.
pub fn entry(e: &LogEntry, me: &str, marks: Option<&[RecipientStatus]>) -> Markup {
    let time = e.created_at.format("%H:%M:%S").to_string();
    let stamp = e.created_at.to_rfc3339();
    match e.kind {
        EventKind::PeerJoined | EventKind::PeerLeft => html! {
            li.entry.membership id={ "e-" (e.seq) } data-seq=(e.seq) {
                time datetime=(stamp) { (time) } " "
                bdi { (visible(&e.sender_name)) }
                @if e.kind == EventKind::PeerJoined { " joined" } @else { " left" }
            }
        },
        _ => {
            let (head, folded) = fold(&e.body);
            let own = e.sender_id == me;
            html! {
                li.entry.message.dm[e.kind == EventKind::Dm].own[own].human[e.sender_kind == PeerKind::Human]
                    id={ "e-" (e.seq) } data-seq=(e.seq) data-id=(e.id) {
                    div.meta {
                        time datetime=(stamp) { (time) } " "
                        bdi.sender { (visible(&e.sender_name)) }
                        @if e.sender_kind == PeerKind::Human { " " span.badge { "human" } }
                        @if let Some(to) = &e.recipient_name { " → " bdi.recipient { (visible(to)) } " " span.badge { "DM" } }
                    }
                    @if folded {
                        div.body { (visible(&head)) "…" }
                        details { summary { "show all (" (e.body.chars().count()) " characters)" } div.body { (visible(&e.body)) } }
                    } @else {
                        div.body { (visible(&e.body)) }
                    }
                    @if own {
                        div.marks id={ "marks-" (e.id) } {
                            @for m in marks.unwrap_or_default() { (mark(&e.id, m)) }
                        }
                    }
                }
            }
        }
    }
}

/// Where one recipient's copy of a message is.
pub fn mark(message_id: &str, m: &RecipientStatus) -> Markup {
    let symbol = match m.state {
        DeliveryState::Stored => "○",
        DeliveryState::Delivered => "◔",
        DeliveryState::Notified => "◑",
        DeliveryState::Read => "●",
        DeliveryState::Held => "⏸",
        DeliveryState::Failed => "✕",
    };
    let hint = match m.state {
        DeliveryState::Held => Some("held by the agent's Claude Code session: let it in from that session (or its relay sidebar)"),
        DeliveryState::Failed => Some("not delivered"),
        _ => None,
    };
    let title = match (&m.detail, hint) {
        (Some(d), Some(h)) => format!("{}: {} — {h}", m.state, visible(d)),
        (Some(d), None) => format!("{}: {}", m.state, visible(d)),
        (None, Some(h)) => format!("{}: {h}", m.state),
        (None, None) => m.state.to_string(),
    };
    html! {
        span class={ "mark st-" (m.state) } data-for=(message_id) data-peer=(m.peer.peer_id) title=(title) {
            (symbol) " " bdi { (visible(&m.peer.name)) } " " (m.state)
            @if let (Some(d), DeliveryState::Held | DeliveryState::Failed) = (&m.detail, m.state) { " (" (visible(d)) ")" }
        }
    }
}

/// A peer as the panel shows it: what `list_peers` says, and for an online agent whose
/// Claude Code session says so, whether it is idle, busy or waiting.
pub struct Peer {
    pub info: PeerInfo,
    pub activity: Option<String>,
}

pub fn peers_panel(peers: &[Peer]) -> Markup {
    html! {
        h2 { "Peers" }
        ul.peers {
            @for Peer { info: p, activity } in peers {
                li.peer.online[p.online].human[p.kind == PeerKind::Human] data-peer=(p.peer_id) {
                    span.dot title=(if p.online { "online" } else { "offline" }) {}
                    bdi.name { (visible(&p.display_name)) }
                    " " span.badge { (p.kind.as_str()) }
                    @if p.kind == PeerKind::Agent {
                        div.where {
                            bdi { (visible(&p.hostname)) } ":" bdi { (visible(&p.working_directory)) }
                            @if let Some(b) = &p.git_branch { " on " bdi { (visible(b)) } }
                        }
                    }
                    div.muted {
                        @if p.online { "online" } @else { "last seen " (p.last_seen.format("%Y-%m-%d %H:%M")) }
                        @if let Some(a) = activity { ", " span class={ "activity " (a) } { (a) } }
                    }
                }
            }
        }
    }
}

/// Messages per sender over the last hour as bars, and who DMs whom.
pub fn activity(entries: &[LogEntry]) -> Markup {
    let mut per_sender: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dms: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.kind.message_kind().is_some()) {
        *per_sender.entry(&e.sender_name).or_default() += 1;
        if let Some(to) = &e.recipient_name {
            *dms.entry((&e.sender_name, to)).or_default() += 1;
        }
    }
    let most = per_sender.values().copied().max().unwrap_or(1).max(1);
    let (bar_height, width) = (18, 220);
    html! {
        h2 { "Last hour" }
        @if per_sender.is_empty() { p.muted { "No messages." } }
        @else {
            svg.bars width=(width) height=(per_sender.len() * bar_height) role="img" aria-label="messages per peer, last hour" {
                @for (i, (name, n)) in per_sender.iter().enumerate() {
                    rect x="0" y=(i * bar_height + 2) height=(bar_height - 6) width=(n * (width - 60) / most + 1) {}
                    text x=(n * (width - 60) / most + 6) y=(i * bar_height + bar_height - 6) { (n) " " (visible(name)) }
                }
            }
        }
        @if !dms.is_empty() {
            table.dms {
                tr { th { "from" } th { "to" } th { "DMs" } }
                @for ((from, to), n) in &dms { tr { td { bdi { (visible(from)) } } td { bdi { (visible(to)) } } td { (n) } } }
            }
        }
    }
}

/// A short page that says what went wrong with a form, for browsers without the script.
pub fn problem(title: &str, why: &str, back: &str) -> Markup {
    layout(title, html! { main.narrow { h1 { (title) } p.error { (why) } p { a href=(back) { "Back" } } } })
}
