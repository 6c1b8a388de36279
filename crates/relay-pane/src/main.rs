//! relay-pane: the sidebar beside one agent's tmux pane. It subscribes to the pane's events
//! through relayd, shows them, and delivers new messages into the agent: through Claude
//! Code's inbox when the pane runs it, else by an announcement typed into the pane.

mod app;
mod deliver;
mod engine;
mod link;
mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use crossterm::event::{Event as TermEvent, EventStream};
use futures::StreamExt;
use relay_local::fallback::Fallback;
use relay_tmux::RealTmux;
use tokio::sync::mpsc;

use app::Action;
use engine::{Engine, Settings};
use link::Link;

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
    #[arg(long, value_enum, default_value_t)]
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
/// How often Claude Code's transcript is read for notices that reached the conversation.
const TRANSCRIPT_CHECK: Duration = Duration::from_millis(250);
/// How often the sidebar looks at the agent's pane (still there? typed into?).
const PANE_CHECK: Duration = Duration::from_secs(2);

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
    let (heard_tx, heard_rx) = mpsc::channel(64);
    let claude_dir = args.claude_dir.clone().or_else(relay_local::claude::claude_dir);
    let inbox = deliver::Inbox::with_claude_dir(&args.pane, claude_dir, heard_tx);
    let settings = Settings {
        pane: args.pane.clone(),
        no_deliver: args.no_deliver,
        fallback: args.fallback,
        intro: args.intro,
        care: deliver::keys::Care { quiet: Duration::from_millis(args.quiet_ms), ..Default::default() },
        patience: Duration::from_secs(args.patience_secs),
        renotify: Duration::from_secs(args.renotify_secs),
        max_reminders_per_hour: args.max_reminders_per_hour,
    };
    let engine = Engine::new(
        settings,
        inbox,
        Arc::new(RealTmux::current()),
        Link::new(socket.clone(), args.pane.clone(), tx),
        report::Reporter::spawn(socket, args.pane.clone()),
        Arc::new(relay_local::notify::Desktop::default()),
    );
    let mut terminal = ratatui::init();
    let outcome = run(&mut terminal, engine, rx, heard_rx, args.renotify_secs).await;
    ratatui::restore();
    outcome
}

/// Waits for whatever comes next, hands it to the engine, and draws.
async fn run(
    terminal: &mut ratatui::DefaultTerminal,
    mut engine: Engine,
    mut rx: mpsc::Receiver<link::Incoming>,
    mut heard_rx: mpsc::Receiver<deliver::Heard>,
    renotify_secs: u64,
) -> Result<()> {
    let mut keys = EventStream::new();
    let mut renotify_check = tokio::time::interval(Duration::from_secs(renotify_secs.div_ceil(4).clamp(1, 15)));
    let mut pane_check = tokio::time::interval(PANE_CHECK);
    let mut transcript_check = tokio::time::interval(TRANSCRIPT_CHECK);
    // tmux hangs up on a closed pane: leave through the front door, so the reply sockets
    // in Claude Code's socket directory go with us
    use tokio::signal::unix::{SignalKind, signal};
    let (mut hangup, mut terminate) = (signal(SignalKind::hangup())?, signal(SignalKind::terminate())?);
    terminal.draw(|f| engine.app.render(f))?;
    loop {
        let announce_at = engine.announce_at();
        let announce = async {
            match announce_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            incoming = rx.recv() => {
                if !engine.on_incoming(incoming).await {
                    return Ok(());
                }
            }
            key = keys.next() => match key {
                Some(Ok(TermEvent::Key(key))) => match engine.app.on_key(key) {
                    Action::Quit => return Ok(()),
                    Action::Redraw | Action::Nothing => {}
                },
                Some(Ok(_)) => {} // resize and the rest: redraw below
                Some(Err(_)) | None => return Ok(()),
            },
            _ = announce => engine.on_announce().await,
            Some(heard) = heard_rx.recv() => engine.on_heard(heard),
            _ = transcript_check.tick(), if engine.awaits_transcript() => engine.on_transcript_check(),
            _ = renotify_check.tick(), if engine.watches_for_reminders() => engine.on_renotify_check(),
            _ = hangup.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
            _ = pane_check.tick() => {
                if !engine.on_pane_check() {
                    return Ok(()); // the agent's pane is gone, and so are we
                }
            }
        }
        terminal.draw(|f| engine.app.render(f))?;
    }
}
