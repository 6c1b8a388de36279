//! relay-pane: the sidebar beside one agent's tmux pane. It subscribes to the pane's events
//! through relayd, shows them, and announces new messages to the agent by keystrokes.

mod app;
mod inject;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use crossterm::event::{Event as TermEvent, EventStream};
use futures::StreamExt;
use relay_proto::local::{Attachment, Reply, Request};
use relay_proto::{Event, EventKind};
use relay_tmux::RealTmux;
use tokio::sync::mpsc;
use tokio::time::Instant;

use app::{Action, App, Connection, PeerRow};

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
    /// Show events without typing announcements into the agent
    #[arg(long)]
    no_deliver: bool,
}

/// Events this close together are announced in one line.
const GATHER: Duration = Duration::from_millis(20);
/// After a line is typed, the next waits this long, so a burst becomes one more line.
const COOLDOWN: Duration = Duration::from_millis(500);
/// How soon to try again when the pane is in copy mode.
const BUSY_RETRY: Duration = Duration::from_secs(1);

enum Incoming {
    Subscribed(Vec<Attachment>),
    Event(Box<Event>),
    Peers(BTreeMap<String, BTreeMap<String, PeerRow>>),
    Lost(String),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let socket = args.socket.clone().unwrap_or_else(relayd::paths::default_socket);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(follow(socket.clone(), args.pane.clone(), tx));
    let mut terminal = ratatui::init();
    let outcome = run(&mut terminal, &args, rx).await;
    ratatui::restore();
    outcome
}

/// Subscribes through relayd, and again after every disconnect, resuming after the last
/// event seen in each group.
async fn follow(socket: PathBuf, pane: String, tx: mpsc::Sender<Incoming>) {
    let mut since: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let lost = match subscribe_once(&socket, &pane, &mut since, &tx).await {
            Ok(()) => "relayd closed the stream".to_owned(),
            Err(e) => e.to_string(),
        };
        if tx.send(Incoming::Lost(lost)).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn subscribe_once(
    socket: &std::path::Path,
    pane: &str,
    since: &mut BTreeMap<String, u64>,
    tx: &mpsc::Sender<Incoming>,
) -> Result<()> {
    let mut client = relayd::client::Client::connect(socket, "relay-pane").await?;
    let attachments = match client.request(&Request::Subscribe { pane: pane.to_owned(), since: since.clone() }).await? {
        Reply::Subscribed { attachments, .. } => attachments,
        Reply::Error { message, .. } => anyhow::bail!(message),
        other => anyhow::bail!("unexpected reply {other:?}"),
    };
    tx.send(Incoming::Subscribed(attachments)).await?;
    tokio::spawn(load_peers(socket.to_owned(), pane.to_owned(), tx.clone()));
    loop {
        if let Reply::Event { event, .. } = client.next().await? {
            since.insert(event.group.clone(), event.seq);
            tx.send(Incoming::Event(Box::new(event))).await?;
        }
    }
}

/// Who is in the pane's groups, asked of the server as the pane's peer.
async fn load_peers(socket: PathBuf, pane: String, tx: mpsc::Sender<Incoming>) {
    let Ok(out) = relay_cli::bridge::call_as_pane(&socket, &pane, "list_peers", serde_json::json!({})).await else { return };
    let mut peers: BTreeMap<String, BTreeMap<String, PeerRow>> = BTreeMap::new();
    for p in out["structured"]["peers"].as_array().into_iter().flatten() {
        let field = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
        let row = PeerRow { name: field("display_name"), online: p["online"] == true };
        peers.entry(field("group_id")).or_default().insert(field("peer_id"), row);
    }
    let _ = tx.send(Incoming::Peers(peers)).await;
}

async fn run(terminal: &mut ratatui::DefaultTerminal, args: &Args, mut rx: mpsc::Receiver<Incoming>) -> Result<()> {
    let tmux = RealTmux::current();
    let mut app = App::new(&args.pane);
    let mut keys = EventStream::new();
    let mut pending: Vec<Event> = Vec::new();
    let mut announce_at: Option<Instant> = None;
    let mut last_typed: Option<Instant> = None;
    let mut pane_check = tokio::time::interval(Duration::from_secs(2));
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
                        app.attachments = attachments;
                        app.connection = Connection::Connected;
                    }
                    Some(Incoming::Event(event)) => {
                        app.on_event(&event);
                        let mine = own_peers(&app).contains(&event.sender.peer_id);
                        if !args.no_deliver && !mine && matches!(event.kind, EventKind::Message | EventKind::Dm) {
                            pending.push(*event);
                            // the first of a burst goes out at once; the rest wait for the cooldown
                            let earliest = Instant::now() + GATHER;
                            let after_cooldown = last_typed.map_or(earliest, |t| t + COOLDOWN);
                            announce_at.get_or_insert(earliest.max(after_cooldown));
                        }
                    }
                    Some(Incoming::Peers(peers)) => app.peers = peers,
                    Some(Incoming::Lost(why)) => app.connection = Connection::Lost(why),
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
                if let Some(line) = inject::announcement(&pending) {
                    match inject::type_line(&tmux, &args.pane, &line).await {
                        Ok(inject::Outcome::Typed) => {
                            pending.clear();
                            app.note = None;
                            last_typed = Some(Instant::now());
                        }
                        Ok(inject::Outcome::Busy) => {
                            app.note = Some(format!("{} waiting: the agent pane is in copy mode", pending.len()));
                            announce_at = Some(Instant::now() + BUSY_RETRY);
                        }
                        Err(e) => {
                            app.note = Some(format!("cannot type into {}: {e}", args.pane));
                            announce_at = Some(Instant::now() + BUSY_RETRY);
                        }
                    }
                } else {
                    pending.clear();
                }
            }
            _ = pane_check.tick() => {
                if relay_tmux::pane(&tmux, &args.pane).is_err() {
                    return Ok(()); // the agent's pane is gone, and so are we
                }
                continue;
            }
        }
        terminal.draw(|f| app.render(f))?;
    }
}
