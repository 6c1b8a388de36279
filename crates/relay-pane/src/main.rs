//! relay-pane: the sidebar beside one agent's tmux pane. It subscribes to the pane's events
//! through relayd, shows them, and delivers new messages into the agent: through Claude
//! Code's inbox when the pane runs it, else by an announcement typed into the pane.

mod app;
mod deliver;
mod link;
mod report;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use clap::builder::TypedValueParser as _;
use crossterm::event::{Event as TermEvent, EventStream};
use futures::StreamExt;
use relay_local::fallback::Fallback;
use relay_local::notify::Notifier as _;
use relay_proto::local::{Attachment, DeliveryPath};
use relay_proto::{DeliveryState, Event, EventKind, Receipt};
use relay_tmux::RealTmux;
use tokio::sync::mpsc;
use tokio::time::Instant;

use app::{Action, App, Connection};
use link::Incoming;

/// The relay sidebar for one agent pane.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The agent's tmux pane (%3)
    #[arg(long, env = "RELAY_AGENT_PANE")]
    pane: String,
    /// relayd's control socket
    #[arg(long, env = "RELAYD_SOCKET")]
    socket: Option<PathBuf>,
    /// Show events without delivering anything into the agent
    #[arg(long)]
    no_deliver: bool,
    /// When Claude Code will not let a message in (refused, denied, expired), type an
    /// announcement into the pane instead: "keys". The default reports and types nothing.
    #[arg(long, default_value_t, value_parser = clap::builder::PossibleValuesParser::new(["none", "keys"]).map(|s| s.parse::<Fallback>().expect("a possible value")))]
    fallback: Fallback,
    /// Type only after the agent's pane has shown no change for this long (milliseconds)
    #[arg(long, env = "RELAY_QUIET_MS", default_value_t = 250)]
    quiet_ms: u64,
    /// After this many seconds of failing to type an announcement, mark its messages
    /// failed and tell the human with a desktop notification
    #[arg(long, env = "RELAY_PATIENCE_SECS", default_value_t = 120)]
    patience_secs: u64,
    /// Remind the agent once of a message it was told of but has not read after this many
    /// seconds; tell the human if it is still unread after as long again
    #[arg(long, env = "RELAY_RENOTIFY_SECS", default_value_t = 600)]
    renotify_secs: u64,
    /// At most this many reminders for one sender's messages in any hour
    #[arg(long, default_value_t = 6)]
    max_reminders_per_hour: usize,
    /// Introduce the agent to relay through its inbox (relay attach found a Claude Code
    /// session in the pane); typed into the pane if the inbox cannot take it
    #[arg(long)]
    intro: bool,
    /// The Claude Code configuration directory the agent runs with (relay attach reads it
    /// from the agent's environment) [default: $CLAUDE_CONFIG_DIR, else ~/.claude]
    #[arg(long)]
    claude_dir: Option<PathBuf>,
    /// Where to log (the terminal is the sidebar); default: pane-<id>.log beside relayd's
    /// state. RUST_LOG sets the level.
    #[arg(long, env = "RELAY_PANE_LOG")]
    log: Option<PathBuf>,
}

/// A log longer than this is started afresh.
const MAX_LOG: u64 = 1 << 20;

/// Events this close together are announced in one typed line.
const GATHER: Duration = Duration::from_millis(20);
/// After a line is typed, the next waits this long, so a burst becomes one more line.
const COOLDOWN: Duration = Duration::from_millis(500);
/// How soon notices the inbox did not take are tried again.
const INBOX_RETRY: Duration = Duration::from_secs(2);
/// A refused introduction is typed when the pane lets it, tried this often at most.
const INTRO_ATTEMPTS: u32 = 60;
const INTRO_RETRY: Duration = Duration::from_secs(2);
/// How often Claude Code's transcript is read for notices that reached the conversation.
const TRANSCRIPT_CHECK: Duration = Duration::from_millis(250);

/// Message events kept to retype when the inbox refuses them, and to remind of.
const RECENT: usize = 256;

/// Where deliveries stand: receipts go to relayd and the sidebar, and what the agent was
/// told but has not read is watched for a reminder.
struct Tracker {
    reporter: report::Reporter,
    renotifier: deliver::renotify::Renotifier,
    recent: VecDeque<Event>,
    /// Messages read (or held, or failed) lately: a reminder checked meanwhile is dropped.
    settled_lately: VecDeque<String>,
}

impl Tracker {
    fn remember(&mut self, event: &Event) {
        self.recent.push_back(event.clone());
        if self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    fn report(&mut self, app: &mut App, receipts: Vec<Receipt>) {
        let now = std::time::Instant::now();
        for r in &receipts {
            app.mark(&r.message_id, app::ME, r.state);
            match r.state {
                DeliveryState::Notified => {
                    if let Some(e) = self.recent.iter().find(|e| e.id == r.message_id) {
                        self.renotifier.notified(e, now);
                    }
                }
                state if state.concerns_recipient() => self.settled(&r.message_id),
                _ => {}
            }
        }
        self.reporter.send(receipts);
    }

    fn settled(&mut self, id: &str) {
        self.renotifier.settled(id);
        self.settled_lately.push_back(id.to_owned());
        if self.settled_lately.len() > RECENT {
            self.settled_lately.pop_front();
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let log = args.log.clone().unwrap_or_else(|| {
        let state = relay_local::paths::default_state_dir();
        let id: String = args.pane.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        let name = format!("pane-{id}.log");
        state.parent().unwrap_or(&state).join(name)
    });
    if let Err(e) = relay_util::init_tracing_to_file(&log, MAX_LOG) {
        eprintln!("relay-pane: cannot log to {}: {e}", log.display());
    }
    let socket = args.socket.clone().unwrap_or_else(relay_local::paths::default_socket);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(link::follow(socket.clone(), args.pane.clone(), tx.clone()));
    let reporter = report::Reporter::spawn(socket.clone(), args.pane.clone());
    let mut terminal = ratatui::init();
    let outcome = run(&mut terminal, &args, &socket, rx, tx, reporter).await;
    ratatui::restore();
    outcome
}

async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    args: &Args,
    socket: &std::path::Path,
    mut rx: mpsc::Receiver<Incoming>,
    tx: mpsc::Sender<Incoming>,
    reporter: report::Reporter,
) -> Result<()> {
    let renotifier = deliver::renotify::Renotifier::new(Duration::from_secs(args.renotify_secs), args.max_reminders_per_hour);
    let mut tracker = Tracker { reporter, renotifier, recent: VecDeque::new(), settled_lately: VecDeque::new() };
    let mut renotify_check = tokio::time::interval(Duration::from_secs(args.renotify_secs.div_ceil(4).clamp(1, 15)));
    let tmux = RealTmux::current();
    let mut app = App::new(&args.pane);
    let mut keys = EventStream::new();
    let (heard_tx, mut heard_rx) = mpsc::channel(64);
    let claude_dir = args.claude_dir.clone().or_else(relay_local::claude::claude_dir);
    let mut inbox = deliver::Inbox::with_claude_dir(&args.pane, claude_dir, heard_tx);
    let mut pending: Vec<Event> = Vec::new();
    // refused by Claude Code, to be announced by keystrokes (--fallback keys)
    let mut keys_only: Vec<Event> = Vec::new();
    let mut announce_at: Option<Instant> = None;
    let mut last_typed: Option<Instant> = None;
    // the introduction, to be typed (the inbox could not take it, or refused it), and the
    // attempts so far
    let mut intro_line: Option<(String, u32)> = None;
    let mut pane_check = tokio::time::interval(Duration::from_secs(2));
    // what relay status was last told of the delivery path, and how many checks ago
    let mut told: Option<(DeliveryPath, u32)> = None;
    // tmux hangs up on a closed pane: leave through the front door, so the reply sockets
    // in Claude Code's socket directory go with us
    use tokio::signal::unix::{SignalKind, signal};
    let (mut hangup, mut terminate) = (signal(SignalKind::hangup())?, signal(SignalKind::terminate())?);
    let mut transcript_check = tokio::time::interval(TRANSCRIPT_CHECK);
    let mut intro = args.intro;
    let care = deliver::keys::Care { quiet: Duration::from_millis(args.quiet_ms), ..Default::default() };
    let mut typist = deliver::keys::Typist::new(care, Duration::from_secs(args.patience_secs));
    let own_peers = |app: &App| app.attachments.iter().map(|a| a.peer_id.clone()).collect::<Vec<_>>();
    terminal.draw(|f| app.render(f))?;
    loop {
        let announce = async {
            match announce_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            incoming = rx.recv() => {
                match incoming {
                    Some(Incoming::Subscribed(attachments)) => {
                        if let Some(first) = attachments.first() {
                            inbox.set_me(&first.display_name);
                            if std::mem::take(&mut intro) && !introduce(&mut inbox, &args.pane, first).await {
                                // typed instead, as relay attach would have
                                intro_line = Some((relay_local::intro::intro_line(&first.display_name, &first.group), 0));
                                announce_at.get_or_insert(Instant::now());
                            }
                        }
                        app.attachments = attachments;
                        app.connection = Connection::Connected;
                    }
                    Some(Incoming::Event(event)) => {
                        app.on_event(&event);
                        let mine = own_peers(&app).contains(&event.sender.peer_id);
                        // our own copy was read (its reminder is off), or the like
                        if mine && event.kind == EventKind::Receipt && event.state.is_some_and(DeliveryState::concerns_recipient) {
                            tracker.settled(&event.id);
                        }
                        if !args.no_deliver && !mine && event.kind.message_kind().is_some() {
                            tracker.remember(&event);
                            pending.push(*event);
                            // the inbox takes each at once (its rate room spaces bursts); a typed
                            // line waits a moment for what comes with it, and a cooldown after the last
                            let at = if inbox.knows_session() {
                                Instant::now()
                            } else {
                                let earliest = Instant::now() + GATHER;
                                earliest.max(last_typed.map_or(earliest, |t| t + COOLDOWN))
                            };
                            announce_at.get_or_insert(at);
                        }
                    }
                    Some(Incoming::Peers(peers)) => app.peers = peers,
                    Some(Incoming::Lost(why)) => app.connection = Connection::Lost(why),
                    Some(Incoming::Note(note)) => app.note = Some(note),
                    Some(Incoming::Agent(agent)) => {
                        // a `relay mcp` run by hand, or by a client elsewhere, names the pane
                        // too: only the agent running in the pane speaks for it
                        match relay_tmux::pane(&tmux, &args.pane) {
                            Ok(p) if !relay_local::agents::runs_under(agent.pid, p.pid, &relay_local::agents::processes()) => {
                                tracing::warn!(pane = %args.pane, pid = agent.pid, "ignoring an agent report from a process outside the pane");
                            }
                            _ => inbox.agent_reported(agent),
                        }
                    }
                    Some(Incoming::Due { mut due, settled }) => {
                        for id in settled {
                            tracker.settled(&id);
                        }
                        // read while the server was asked
                        due.remind.retain(|e| !tracker.settled_lately.contains(&e.id) && tracker.renotifier.watches(&e.id));
                        due.tell_human.retain(|e| !tracker.settled_lately.contains(&e.id));
                        if !due.remind.is_empty() {
                            pending.extend(due.remind);
                            announce_at.get_or_insert(Instant::now());
                        }
                        if !due.tell_human.is_empty() {
                            tell_human_unread(&args.pane, &due.tell_human, &mut app);
                        }
                    }
                    None => return Ok(()),
                }
            }
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(key))) => match app.on_key(key) {
                    Action::Quit => return Ok(()),
                    Action::Redraw | Action::Nothing => {}
                },
                Some(Ok(_)) => {} // resize and the rest: redraw below
                Some(Err(_)) | None => return Ok(()),
            },
            _ = announce => {
                announce_at = None;
                if let Some((line, attempts)) = intro_line.as_mut() {
                    let status = inbox.agent_status();
                    match typist.type_once(&tmux, &args.pane, line, status.as_deref()).await {
                        Ok(deliver::keys::Outcome::Typed) => intro_line = None,
                        _ if *attempts >= INTRO_ATTEMPTS => {
                            tracing::warn!(pane = %args.pane, "gave up typing the introduction: the pane never took it");
                            intro_line = None;
                        }
                        _ => {
                            *attempts += 1;
                            announce_at = Some(Instant::now() + INTRO_RETRY);
                        }
                    }
                }
                if !keys_only.is_empty() {
                    let status = inbox.agent_status();
                    if let Some(at) = type_announcement(&mut typist, &tmux, &args.pane, &mut keys_only, &mut app, status.as_deref(), &mut tracker).await {
                        announce_at = Some(at);
                    }
                }
                if pending.is_empty() {
                    continue;
                }
                if inbox.session().is_some() {
                    if let Some(wait) = inbox.wait_for_room() {
                        announce_at = Some(Instant::now() + wait);
                        continue;
                    }
                    let posting = inbox.post(&pending, &|id| tracker.renotifier.is_reminder(id)).await;
                    if let deliver::Posting::Posted { receipts, left } = posting {
                        pending = left;
                        if !pending.is_empty() {
                            announce_at = Some(Instant::now() + INBOX_RETRY);
                        }
                        last_typed = Some(Instant::now());
                        tracker.report(&mut app, receipts);
                        app.note = None;
                        terminal.draw(|f| app.render(f))?;
                        continue;
                    }
                }
                // no inbox: announce by keystrokes
                let status = inbox.agent_status();
                match type_announcement(&mut typist, &tmux, &args.pane, &mut pending, &mut app, status.as_deref(), &mut tracker).await {
                    Some(at) => announce_at = Some(at),
                    None => last_typed = Some(Instant::now()),
                }
            }
            heard = heard_rx.recv() => {
                let Some(heard) = heard else { continue };
                let outcome = inbox.on_heard(heard);
                tracker.report(&mut app, outcome.receipts);
                if let Some(note) = outcome.note {
                    app.note = Some(note);
                }
                if let Some(reply) = outcome.reply {
                    tokio::spawn(link::send_reply(socket.to_owned(), args.pane.clone(), reply, tx.clone()));
                }
                if let Some(group) = outcome.intro_refused.filter(|_| args.fallback == Fallback::Keys) {
                    // typed with the same care as announcements
                    if let Some(me) = app.attachments.iter().find(|a| a.group == group) {
                        intro_line = Some((relay_local::intro::intro_line(&me.display_name, &group), 0));
                        announce_at.get_or_insert(Instant::now());
                    }
                }
                if args.fallback == Fallback::Keys && !outcome.refused.is_empty() {
                    // typed, never posted again: the session refused them
                    let refused = tracker.recent.iter().filter(|e| outcome.refused.iter().any(|(g, id)| *g == e.group && *id == e.id));
                    keys_only.extend(refused.cloned());
                    announce_at.get_or_insert(Instant::now());
                }
            }
            _ = transcript_check.tick(), if inbox.has_pending() => {
                let receipts = inbox.check_transcript();
                if receipts.is_empty() {
                    continue;
                }
                tracker.report(&mut app, receipts);
            }
            _ = renotify_check.tick(), if tracker.renotifier.is_watching() => {
                let due = tracker.renotifier.due(std::time::Instant::now());
                if !due.remind.is_empty() || !due.tell_human.is_empty() {
                    tokio::spawn(link::confirm_unread(socket.to_owned(), args.pane.clone(), due, tx.clone()));
                }
                continue;
            }
            _ = hangup.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = pane_check.tick() => {
                if relay_tmux::pane(&tmux, &args.pane).is_err() {
                    return Ok(()); // the agent's pane is gone, and so are we
                }
                if !args.no_deliver {
                    let path = delivery_path(&mut inbox);
                    app.typing = matches!(path, DeliveryPath::Keys { .. });
                    if app.typing {
                        typist.observe(&tmux, &args.pane);
                    }
                    // again now and then: a restarted relayd knows nothing
                    if told.as_ref().is_none_or(|(last, checks)| *last != path || *checks >= TELL_AGAIN_CHECKS) {
                        tokio::spawn(link::tell_delivery(socket.to_owned(), args.pane.clone(), path.clone()));
                        told = Some((path, 0));
                    } else if let Some((_, checks)) = told.as_mut() {
                        *checks += 1;
                    }
                }
            }
        }
        terminal.draw(|f| app.render(f))?;
    }
}

/// Pane checks (2 s each) between telling relayd the same delivery path again.
const TELL_AGAIN_CHECKS: u32 = 30;

/// How messages reach the agent now: its inbox when its Claude Code session is known.
fn delivery_path(inbox: &mut deliver::Inbox) -> DeliveryPath {
    if inbox.session().is_some() {
        return DeliveryPath::Inbox;
    }
    let why = match inbox.claude_dir() {
        Some(dir) => {
            format!("no Claude Code session of this pane in {} (another agent, or started with another CLAUDE_CONFIG_DIR?)", dir.display())
        }
        None => "no Claude Code configuration directory is known for this pane's agent".to_owned(),
    };
    DeliveryPath::Keys { why }
}

/// Tells the agent who it is through its inbox; false when the inbox cannot take it.
async fn introduce(inbox: &mut deliver::Inbox, pane: &str, attachment: &Attachment) -> bool {
    // Claude Code may still be starting: give its session a moment to appear
    for _ in 0..20 {
        if inbox.session().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    match inbox.introduce(&attachment.group).await {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(%pane, error = %e, "cannot introduce through the inbox; typing it");
            false
        }
    }
}

/// One attempt at announcing `pending` by keystrokes; when to try again, if it must.
async fn type_announcement(
    typist: &mut deliver::keys::Typist,
    tmux: &RealTmux,
    pane: &str,
    pending: &mut Vec<Event>,
    app: &mut App,
    agent_status: Option<&str>,
    tracker: &mut Tracker,
) -> Option<Instant> {
    use deliver::keys::Announced;
    let announced = typist.announce(tmux, pane, pending, &|id| tracker.renotifier.is_reminder(id), agent_status).await;
    match announced {
        Announced::Typed(receipts) => {
            tracker.report(app, receipts);
            app.note = None;
            None
        }
        Announced::Later(at, why) => {
            app.note = Some(format!("{} waiting: {why}", pending.len()));
            Some(at)
        }
        Announced::GaveUp(receipts, why) => {
            let n = receipts.len();
            tracker.report(app, receipts);
            app.note = Some(format!("✗ {n} not delivered: {why}"));
            tell_human(
                format!("relay: {n} message(s) not delivered to {pane}"),
                format!(
                    "relay could not type into the agent's pane ({why}). Read them in the sidebar, or tell the agent to call read_new_messages."
                ),
            );
            None
        }
    }
}

/// Tells the human that the agent has not read these messages, even after a reminder.
fn tell_human_unread(pane: &str, unread: &[Event], app: &mut App) {
    let n = unread.len();
    let mut senders: Vec<String> = unread.iter().map(|e| e.sender.name.clone()).collect();
    senders.dedup();
    app.note = Some(format!("{n} message(s) still unread by the agent"));
    tell_human(
        format!("relay: {n} message(s) unread in {pane}"),
        format!("The agent in {pane} was told of messages from {} but has not read them, even after a reminder.", senders.join(", ")),
    );
}

/// A desktop notification for the human at this machine.
fn tell_human(summary: String, body: String) {
    relay_local::notify::Desktop::default().notify(relay_local::notify::Notice { summary, body });
}
