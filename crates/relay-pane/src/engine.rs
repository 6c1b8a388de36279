//! The sidebar's delivery engine, apart from the terminal: what it does with each thing that
//! arrives (an event from relayd, a due announcement, what Claude Code's inbox heard, a
//! check of the pane), and when it next wants the announcement timer. `main.rs` waits for
//! those and draws [`Engine::app`] after each step.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use relay_local::fallback::Fallback;
use relay_local::intro::intro_line;
use relay_local::notify::Notifier;
use relay_proto::local::{Attachment, DeliveryPath};
use relay_proto::{DeliveryState, Event, EventKind, Receipt};
use relay_tmux::Tmux;
use tokio::time::Instant;

use crate::app::{self, App, Connection};
use crate::deliver::keys::{Announced, Care, Outcome, Typist};
use crate::deliver::renotify::{Due, Renotifier};
use crate::deliver::{self, Heard, Posting};
use crate::link::{Incoming, Link};
use crate::report::Reporter;

/// Events this close together are announced in one typed line.
const GATHER: Duration = Duration::from_millis(20);
/// After a line is typed, the next waits this long, so a burst becomes one more line.
const COOLDOWN: Duration = Duration::from_millis(500);
/// How soon notices the inbox did not take are tried again.
const INBOX_RETRY: Duration = Duration::from_secs(2);
/// A refused introduction is typed when the pane lets it, tried this often at most.
const INTRO_ATTEMPTS: u32 = 60;
const INTRO_RETRY: Duration = Duration::from_secs(2);
/// Message events kept to retype when the inbox refuses them, and to remind of.
const RECENT: usize = 256;
/// Pane checks between telling relayd the same delivery path again (a restarted relayd
/// knows nothing).
const TELL_AGAIN_CHECKS: u32 = 30;

/// How the engine delivers, as the command line set it.
pub struct Settings {
    pub pane: String,
    /// Show events, deliver nothing.
    pub no_deliver: bool,
    pub fallback: Fallback,
    /// Introduce the agent through its inbox once subscribed.
    pub intro: bool,
    pub care: Care,
    /// How long typing may fail before its messages are marked failed.
    pub patience: Duration,
    pub renotify: Duration,
    pub max_reminders_per_hour: usize,
}

/// Where deliveries stand: receipts go to relayd and the sidebar, and what the agent was
/// told but has not read is watched for a reminder.
struct Tracker {
    reporter: Reporter,
    renotifier: Renotifier,
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

pub struct Engine {
    settings: Settings,
    pub app: App,
    tracker: Tracker,
    inbox: deliver::Inbox,
    typist: Typist,
    tmux: Arc<dyn Tmux>,
    link: Link,
    notifier: Arc<dyn Notifier>,
    /// Messages to tell the agent of.
    pending: Vec<Event>,
    /// Refused by Claude Code, to be announced by keystrokes (`--fallback keys`).
    keys_only: Vec<Event>,
    announce_at: Option<Instant>,
    last_typed: Option<Instant>,
    /// The introduction, to be typed (the inbox could not take it, or refused it), and the
    /// attempts so far.
    intro_line: Option<(String, u32)>,
    /// What relayd was last told of the delivery path, and how many checks ago.
    told: Option<((DeliveryPath, Option<String>), u32)>,
}

impl Engine {
    pub fn new(
        settings: Settings,
        inbox: deliver::Inbox,
        tmux: Arc<dyn Tmux>,
        link: Link,
        reporter: Reporter,
        notifier: Arc<dyn Notifier>,
    ) -> Self {
        let renotifier = Renotifier::new(settings.renotify, settings.max_reminders_per_hour);
        Self {
            app: App::new(&settings.pane),
            tracker: Tracker { reporter, renotifier, recent: VecDeque::new(), settled_lately: VecDeque::new() },
            inbox,
            typist: Typist::new(settings.care, settings.patience),
            tmux,
            link,
            notifier,
            pending: Vec::new(),
            keys_only: Vec::new(),
            announce_at: None,
            last_typed: None,
            intro_line: None,
            told: None,
            settings,
        }
    }

    /// When the announcement step wants to run next.
    pub fn announce_at(&self) -> Option<Instant> {
        self.announce_at
    }

    /// Whether Claude Code's transcript should be read for notices that reached it.
    pub fn awaits_transcript(&self) -> bool {
        self.inbox.has_pending()
    }

    /// Whether any message waits for a reminder.
    pub fn watches_for_reminders(&self) -> bool {
        self.tracker.renotifier.is_watching()
    }

    /// Something from relayd (or from a question asked of it). False: the link is gone.
    pub async fn on_incoming(&mut self, incoming: Option<Incoming>) -> bool {
        match incoming {
            Some(Incoming::Subscribed(attachments)) => self.on_subscribed(attachments).await,
            Some(Incoming::Event(event)) => self.on_event(*event),
            Some(Incoming::Peers(peers)) => self.app.peers = peers,
            Some(Incoming::Lost(why)) => self.app.connection = Connection::Lost(why),
            Some(Incoming::Note(note)) => self.app.note = Some(note),
            Some(Incoming::Agent(agent)) => {
                // a `relay mcp` run by hand, or by a client elsewhere, names the pane too:
                // only the agent running in the pane speaks for it
                let processes = relay_local::agents::processes();
                match relay_tmux::pane(&*self.tmux, &self.settings.pane) {
                    Ok(p) if !relay_local::agents::runs_under(agent.pid, p.pid, &processes) => {
                        tracing::warn!(pane = %self.settings.pane, pid = agent.pid, "ignoring an agent report from a process outside the pane");
                    }
                    _ => self.inbox.agent_reported(agent),
                }
            }
            Some(Incoming::Due { due, settled }) => self.on_due(due, settled),
            None => return false,
        }
        true
    }

    async fn on_subscribed(&mut self, attachments: Vec<Attachment>) {
        if let Some(first) = attachments.first() {
            self.inbox.set_me(&first.display_name);
            if std::mem::take(&mut self.settings.intro) && !self.introduce(first).await {
                // typed instead, as relay attach would have
                self.intro_line = Some((intro_line(&first.display_name, &first.group), 0));
                self.announce_at.get_or_insert(Instant::now());
            }
        }
        self.app.attachments = attachments;
        self.app.connection = Connection::Connected;
    }

    /// A message, a membership change or a receipt for one of the pane's groups.
    pub fn on_event(&mut self, event: Event) {
        self.app.on_event(&event);
        let mine = self.app.attachments.iter().any(|a| a.peer_id == event.sender.peer_id);
        // our own copy was read (its reminder is off), or the like
        if mine && event.kind == EventKind::Receipt && event.state.is_some_and(DeliveryState::concerns_recipient) {
            self.tracker.settled(&event.id);
        }
        if self.settings.no_deliver || mine || event.kind.message_kind().is_none() {
            return;
        }
        self.tracker.remember(&event);
        self.pending.push(event);
        // the inbox takes each at once (its rate room spaces bursts); a typed line waits a
        // moment for what comes with it, and a cooldown after the last
        let at = if self.inbox.knows_session() {
            Instant::now()
        } else {
            let earliest = Instant::now() + GATHER;
            earliest.max(self.last_typed.map_or(earliest, |t| t + COOLDOWN))
        };
        self.announce_at.get_or_insert(at);
    }

    /// Reminders due, checked with the server.
    fn on_due(&mut self, mut due: Due, settled: Vec<String>) {
        for id in settled {
            self.tracker.settled(&id);
        }
        // read while the server was asked
        let tracker = &self.tracker;
        due.remind.retain(|e| !tracker.settled_lately.contains(&e.id) && tracker.renotifier.watches(&e.id));
        due.tell_human.retain(|e| !tracker.settled_lately.contains(&e.id));
        if !due.remind.is_empty() {
            self.pending.extend(due.remind);
            self.announce_at.get_or_insert(Instant::now());
        }
        if !due.tell_human.is_empty() {
            self.tell_human_unread(&due.tell_human);
        }
    }

    /// The announcement timer fired: the introduction, refused messages, then what is pending.
    pub async fn on_announce(&mut self) {
        self.announce_at = None;
        self.type_intro().await;
        if !self.keys_only.is_empty() {
            let mut keys_only = std::mem::take(&mut self.keys_only);
            if let Some(at) = self.type_announcement(&mut keys_only).await {
                self.announce_at = Some(at);
            }
            self.keys_only = keys_only;
        }
        if self.pending.is_empty() {
            return;
        }
        if self.inbox.session().is_some() {
            if let Some(wait) = self.inbox.wait_for_room() {
                self.announce_at = Some(Instant::now() + wait);
                return;
            }
            let renotifier = &self.tracker.renotifier;
            let posting = self.inbox.post(&self.pending, &|id| renotifier.is_reminder(id)).await;
            if let Posting::Posted { receipts, left } = posting {
                self.pending = left;
                if !self.pending.is_empty() {
                    self.announce_at = Some(Instant::now() + INBOX_RETRY);
                }
                self.last_typed = Some(Instant::now());
                self.tracker.report(&mut self.app, receipts);
                self.app.note = None;
                return;
            }
        }
        // no inbox: announce by keystrokes
        let mut pending = std::mem::take(&mut self.pending);
        match self.type_announcement(&mut pending).await {
            Some(at) => self.announce_at = Some(at),
            None => self.last_typed = Some(Instant::now()),
        }
        self.pending = pending;
    }

    async fn type_intro(&mut self) {
        let Some((line, attempts)) = self.intro_line.as_mut() else { return };
        let status = self.inbox.agent_status();
        match self.typist.type_once(&*self.tmux, &self.settings.pane, line, status.as_deref()).await {
            Ok(Outcome::Typed) => self.intro_line = None,
            _ if *attempts >= INTRO_ATTEMPTS => {
                tracing::warn!(pane = %self.settings.pane, "gave up typing the introduction: the pane never took it");
                self.intro_line = None;
            }
            _ => {
                *attempts += 1;
                self.announce_at = Some(Instant::now() + INTRO_RETRY);
            }
        }
    }

    /// What a reply socket in Claude Code's inbox heard: a receipt, or the agent's reply.
    pub fn on_heard(&mut self, heard: Heard) {
        let outcome = self.inbox.on_heard(heard);
        self.tracker.report(&mut self.app, outcome.receipts);
        if let Some(note) = outcome.note {
            self.app.note = Some(note);
        }
        if let Some(reply) = outcome.reply {
            self.link.send_reply(reply);
        }
        let type_refused = self.settings.fallback == Fallback::Keys;
        if let Some(group) = outcome.intro_refused.filter(|_| type_refused) {
            // typed with the same care as announcements
            if let Some(me) = self.app.attachments.iter().find(|a| a.group == group) {
                self.intro_line = Some((intro_line(&me.display_name, &group), 0));
                self.announce_at.get_or_insert(Instant::now());
            }
        }
        if type_refused && !outcome.refused.is_empty() {
            // typed, never posted again: the session refused them
            let refused = self.tracker.recent.iter().filter(|e| outcome.refused.iter().any(|(g, id)| *g == e.group && *id == e.id));
            self.keys_only.extend(refused.cloned());
            self.announce_at.get_or_insert(Instant::now());
        }
    }

    /// Reads Claude Code's transcript for notices that reached the conversation.
    pub fn on_transcript_check(&mut self) {
        let receipts = self.inbox.check_transcript();
        if !receipts.is_empty() {
            self.tracker.report(&mut self.app, receipts);
        }
    }

    /// Reminders that are due go out once the server confirms they are still unread.
    pub fn on_renotify_check(&mut self) {
        let due = self.tracker.renotifier.due(std::time::Instant::now());
        if !due.remind.is_empty() || !due.tell_human.is_empty() {
            self.link.confirm_unread(due);
        }
    }

    /// Looks at the agent's pane now and then; false once it is gone (and so are we).
    pub fn on_pane_check(&mut self) -> bool {
        if relay_tmux::pane(&*self.tmux, &self.settings.pane).is_err() {
            return false;
        }
        if self.settings.no_deliver {
            return true;
        }
        let path = self.delivery_path();
        self.app.typing = matches!(path, DeliveryPath::Keys { .. });
        if self.app.typing {
            self.typist.observe(&*self.tmux, &self.settings.pane);
        }
        let told = (path, self.inbox.agent_status());
        if self.told.as_ref().is_none_or(|(last, checks)| *last != told || *checks >= TELL_AGAIN_CHECKS) {
            self.link.tell_delivery(told.0.clone(), told.1.clone());
            self.told = Some((told, 0));
        } else if let Some((_, checks)) = self.told.as_mut() {
            *checks += 1;
        }
        true
    }

    /// How messages reach the agent now: its inbox when its Claude Code session is known.
    fn delivery_path(&mut self) -> DeliveryPath {
        if self.inbox.session().is_some() {
            return DeliveryPath::Inbox;
        }
        let why = match self.inbox.claude_dir() {
            Some(dir) => format!(
                "no Claude Code session of this pane in {} (another agent, or started with another CLAUDE_CONFIG_DIR?)",
                dir.display()
            ),
            None => "no Claude Code configuration directory is known for this pane's agent".to_owned(),
        };
        DeliveryPath::Keys { why }
    }

    /// Tells the agent who it is through its inbox; false when the inbox cannot take it.
    async fn introduce(&mut self, attachment: &Attachment) -> bool {
        // Claude Code may still be starting: give its session a moment to appear
        for _ in 0..20 {
            if self.inbox.session().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        match self.inbox.introduce(&attachment.group).await {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(pane = %self.settings.pane, error = %e, "cannot introduce through the inbox; typing it");
                false
            }
        }
    }

    /// One attempt at announcing `pending` by keystrokes; when to try again, if it must.
    async fn type_announcement(&mut self, pending: &mut Vec<Event>) -> Option<Instant> {
        let status = self.inbox.agent_status();
        let renotifier = &self.tracker.renotifier;
        let pane = &self.settings.pane;
        let announced = self.typist.announce(&*self.tmux, pane, pending, &|id| renotifier.is_reminder(id), status.as_deref()).await;
        match announced {
            Announced::Typed(receipts) => {
                self.tracker.report(&mut self.app, receipts);
                self.app.note = None;
                None
            }
            Announced::Later(at, why) => {
                self.app.note = Some(format!("{} waiting: {why}", pending.len()));
                Some(at)
            }
            Announced::GaveUp(receipts, why) => {
                let n = receipts.len();
                self.tracker.report(&mut self.app, receipts);
                self.app.note = Some(format!("✗ {n} not delivered: {why}"));
                self.tell_human(
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
    fn tell_human_unread(&mut self, unread: &[Event]) {
        let n = unread.len();
        let mut senders: Vec<String> = unread.iter().map(|e| e.sender.name.clone()).collect();
        senders.dedup();
        self.app.note = Some(format!("{n} message(s) still unread by the agent"));
        let pane = &self.settings.pane;
        self.tell_human(
            format!("relay: {n} message(s) unread in {pane}"),
            format!("The agent in {pane} was told of messages from {} but has not read them, even after a reminder.", senders.join(", ")),
        );
    }

    /// A desktop notification for the human at this machine.
    fn tell_human(&self, summary: String, body: String) {
        self.notifier.notify(relay_local::notify::Notice { summary, body });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chrono::Utc;
    use relay_local::notify::Notice;
    use relay_proto::PeerRef;
    use relay_tmux::FakeTmux;
    use tokio::sync::mpsc;

    use super::*;

    #[derive(Default)]
    struct Told(Mutex<Vec<Notice>>);

    impl Notifier for Told {
        fn notify(&self, notice: Notice) {
            self.0.lock().unwrap().push(notice);
        }
    }

    /// An engine for pane %3 (peer p_me in group g) with no Claude Code session, a scripted
    /// tmux, and a relayd that is not there.
    fn sidebar(no_deliver: bool) -> (Engine, Arc<FakeTmux>, Arc<Told>) {
        let (heard, _) = mpsc::channel(1);
        let (tx, _) = mpsc::channel(1);
        let socket = std::path::PathBuf::from("/nonexistent/relayd.sock");
        let settings = Settings {
            pane: "%3".into(),
            no_deliver,
            fallback: Fallback::None,
            intro: false,
            care: Care::default(),
            patience: Duration::from_secs(120),
            renotify: Duration::from_secs(600),
            max_reminders_per_hour: 6,
        };
        let (tmux, told) = (Arc::new(FakeTmux::default()), Arc::new(Told::default()));
        let mut engine = Engine::new(
            settings,
            deliver::Inbox::with_claude_dir("%3", None, heard),
            tmux.clone(),
            Link::new(socket.clone(), "%3".into(), tx),
            Reporter::spawn(socket, "%3".into()),
            told.clone(),
        );
        engine.app.attachments = vec![Attachment {
            pane: "%3".into(),
            server: "http://s".into(),
            group: "g".into(),
            peer_id: "p_me".into(),
            display_name: "box:me".into(),
            working_directory: "/me".into(),
        }];
        (engine, tmux, told)
    }

    fn event(kind: EventKind, id: &str, from: &str) -> Event {
        Event {
            kind,
            id: id.into(),
            seq: 1,
            group: "g".into(),
            sender: PeerRef { peer_id: from.into(), name: format!("box:{from}") },
            sender_kind: Default::default(),
            recipient: None,
            preview: "hi".into(),
            time: Utc::now(),
            text: Some("hi".into()),
            state: None,
            detail: None,
        }
    }

    #[tokio::test]
    async fn others_messages_are_gathered_for_one_announcement_and_nothing_else_is() {
        let (mut engine, _, _) = sidebar(false);
        engine.on_event(event(EventKind::Message, "m_own", "p_me"));
        engine.on_event(event(EventKind::PeerJoined, "j_1", "p_bob"));
        assert!(engine.pending.is_empty() && engine.announce_at().is_none(), "own messages and joins are not announced");
        let before = Instant::now();
        engine.on_event(event(EventKind::Message, "m_1", "p_bob"));
        engine.on_event(event(EventKind::Dm, "m_2", "p_bob"));
        assert_eq!(engine.pending.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["m_1", "m_2"]);
        let at = engine.announce_at().expect("an announcement is due");
        assert!(at >= before + GATHER, "a typed line waits a moment for what comes with it");

        let (mut watching, _, _) = sidebar(true);
        watching.on_event(event(EventKind::Message, "m_1", "p_bob"));
        assert!(watching.pending.is_empty() && watching.announce_at().is_none(), "--no-deliver only shows");
    }

    #[tokio::test]
    async fn a_reminder_read_meanwhile_is_dropped_and_the_human_hears_of_the_unread() {
        let (mut engine, _, told) = sidebar(false);
        let (read, unread) = (event(EventKind::Dm, "m_read", "p_bob"), event(EventKind::Dm, "m_unread", "p_bob"));
        let due = Due { remind: vec![read.clone()], tell_human: vec![unread] };
        engine.on_due(due, vec!["m_read".into()]);
        assert!(engine.pending.is_empty(), "a message read while the server was asked needs no reminder");
        let notices = told.0.lock().unwrap();
        assert_eq!(notices.len(), 1);
        assert!(notices[0].body.contains("box:p_bob") && notices[0].summary.contains("1 message(s) unread in %3"), "{notices:?}");
    }

    #[tokio::test]
    async fn the_sidebar_ends_with_its_agents_pane() {
        let (mut engine, tmux, _) = sidebar(true);
        tmux.answer("display-message", Ok("%3\t1\tclaude\t/w\ts:0.0\t0\t80\t0\t0\n"));
        assert!(engine.on_pane_check());
        tmux.answer("display-message", Err("can't find pane: %3"));
        assert!(!engine.on_pane_check());
    }
}
