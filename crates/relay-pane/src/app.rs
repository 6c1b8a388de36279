//! The sidebar's state and its drawing; no I/O, so it is tested with ratatui's TestBackend.

use std::collections::BTreeMap;

use chrono::{DateTime, FixedOffset, Local, Utc};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use relay_proto::local::Attachment;
use relay_proto::{DeliveryState, Event, EventKind};
use unicode_width::UnicodeWidthChar;

/// The key under which a message's delivery into this pane's own agent is marked.
pub const ME: &str = "";

/// Log entries kept; older ones scroll away for good (history is on the server).
const MAX_LOG: usize = 2000;
const SENDER_COLOURS: [Color; 6] = [Color::Cyan, Color::Green, Color::Yellow, Color::Magenta, Color::Blue, Color::LightRed];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    Connecting,
    Connected,
    Lost(String),
}

#[derive(Debug, Clone)]
struct Entry {
    id: String,
    time: DateTime<Utc>,
    sender: String,
    group: String,
    dm: bool,
    text: String,
    system: bool,
    /// Where the copies are, by recipient: for one's own messages, from the receipts; for
    /// messages to this pane, how delivery into the agent went.
    states: BTreeMap<String, DeliveryState>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    pub name: String,
    pub online: bool,
}

pub enum Action {
    Quit,
    Redraw,
    Nothing,
}

pub struct App {
    pub pane: String,
    pub attachments: Vec<Attachment>,
    pub connection: Connection,
    log: Vec<Entry>,
    /// By group, then peer id.
    pub peers: BTreeMap<String, BTreeMap<String, PeerRow>>,
    /// Lines scrolled up from the bottom.
    scroll: usize,
    /// A note in the status line (held deliveries, errors).
    pub note: Option<String>,
    /// Times are shown in this zone (the local one).
    pub zone: FixedOffset,
    /// Messages are typed into the agent's pane, its inbox not being found.
    pub typing: bool,
}

impl App {
    pub fn new(pane: &str) -> Self {
        Self {
            pane: pane.to_owned(),
            attachments: Vec::new(),
            connection: Connection::Connecting,
            log: Vec::new(),
            peers: BTreeMap::new(),
            scroll: 0,
            note: None,
            zone: *Local::now().offset(),
            typing: false,
        }
    }

    pub fn on_event(&mut self, e: &Event) {
        let (text, system) = match e.kind {
            EventKind::Message | EventKind::Dm => (e.preview.clone(), false),
            EventKind::PeerJoined => {
                self.peers
                    .entry(e.group.clone())
                    .or_default()
                    .insert(e.sender.peer_id.clone(), PeerRow { name: e.sender.name.clone(), online: true });
                ("joined".to_owned(), true)
            }
            EventKind::PeerLeft => {
                if let Some(g) = self.peers.get_mut(&e.group) {
                    g.remove(&e.sender.peer_id);
                }
                ("left".to_owned(), true)
            }
            EventKind::Receipt => {
                if let Some(state) = e.state {
                    // our own copy is marked under ME, as this pane's own reports are
                    let own = self.attachments.iter().any(|a| a.peer_id == e.sender.peer_id);
                    self.mark(&e.id, if own { ME } else { &e.sender.peer_id }, state);
                }
                return;
            }
            EventKind::Unknown => return,
        };
        self.log.push(Entry {
            id: e.id.clone(),
            time: e.time,
            sender: e.sender.name.clone(),
            group: e.group.clone(),
            dm: e.kind == EventKind::Dm,
            text,
            system,
            states: BTreeMap::new(),
        });
        if self.log.len() > MAX_LOG {
            self.log.drain(..self.log.len() - MAX_LOG);
        }
    }

    /// Records that `peer_id`'s copy of message `id` reached `state` (never a step back).
    pub fn mark(&mut self, id: &str, peer_id: &str, state: DeliveryState) {
        let Some(entry) = self.log.iter_mut().rev().find(|e| e.id == id) else { return };
        let current = entry.states.get(peer_id).copied().unwrap_or(DeliveryState::Stored);
        if current.can_move_to(state) {
            entry.states.insert(peer_id.to_owned(), state);
        }
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Char('c') if ctrl => Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => self.scroll_by(1),
            KeyCode::Down | KeyCode::Char('j') => self.scroll_by(-1),
            KeyCode::PageUp => self.scroll_by(10),
            KeyCode::PageDown => self.scroll_by(-10),
            KeyCode::End | KeyCode::Char('G') => {
                self.scroll = 0;
                Action::Redraw
            }
            _ => Action::Nothing,
        }
    }

    fn scroll_by(&mut self, lines: isize) -> Action {
        self.scroll = self.scroll.saturating_add_signed(lines);
        Action::Redraw
    }

    pub fn render(&self, frame: &mut Frame) {
        let area = frame.area();
        let peer_lines = self.peers.values().map(|g| g.len()).sum::<usize>().min(8) as u16;
        let [header, log, peers] =
            Layout::vertical([Constraint::Length(3), Constraint::Min(3), Constraint::Length(peer_lines + 2)]).areas(area);
        frame.render_widget(Paragraph::new(self.header_lines()), header);
        self.render_log(frame, log);
        self.render_peers(frame, peers);
    }

    fn header_lines(&self) -> Vec<Line<'_>> {
        let groups: Vec<&str> = self.attachments.iter().map(|a| a.group.as_str()).collect();
        let me = self.attachments.first().map(|a| a.display_name.as_str()).unwrap_or("not attached");
        let (state, colour) = match &self.connection {
            Connection::Connecting => ("connecting…".to_owned(), Color::Yellow),
            Connection::Connected => ("connected".to_owned(), Color::Green),
            Connection::Lost(why) => (format!("reconnecting: {why}"), Color::Red),
        };
        vec![
            Line::from(vec![
                Span::styled("relay ", Style::default().add_modifier(Modifier::BOLD)),
                Span::raw(if groups.is_empty() { "-".to_owned() } else { groups.join(", ") }),
            ]),
            Line::from(vec![
                Span::raw(format!("{me} · {}", self.pane)),
                if self.typing {
                    Span::styled(" · ⌨ typing (no inbox: relay status)", Style::default().fg(Color::Yellow))
                } else {
                    Span::raw("")
                },
            ]),
            Line::from(Span::styled(self.note.clone().unwrap_or(state), Style::default().fg(colour))),
        ]
    }

    fn render_log(&self, frame: &mut Frame, area: Rect) {
        let block = Block::default().borders(Borders::TOP).title(" messages ");
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let width = inner.width.max(1) as usize;
        let mut lines: Vec<Line> = Vec::new();
        for e in &self.log {
            let time = e.time.with_timezone(&self.zone).format("%H:%M").to_string();
            let colour = colour_of(&e.sender);
            let mut head = vec![
                Span::styled(time, Style::default().fg(Color::DarkGray)),
                Span::raw(" "),
                Span::styled(e.sender.clone(), Style::default().fg(colour).add_modifier(Modifier::BOLD)),
            ];
            if e.dm {
                head.push(Span::styled(" DM", Style::default().fg(Color::LightMagenta).add_modifier(Modifier::BOLD)));
            }
            if self.attachments.len() > 1 {
                head.push(Span::styled(format!(" #{}", e.group), Style::default().fg(Color::DarkGray)));
            }
            head.extend(state_marks(&e.states));
            lines.push(Line::from(head));
            let style = if e.system { Style::default().fg(Color::DarkGray) } else { Style::default() };
            for piece in wrap(&e.text, width.saturating_sub(2).max(1)) {
                lines.push(Line::from(Span::styled(format!("  {piece}"), style)));
            }
        }
        let height = inner.height as usize;
        let bottom = lines.len().saturating_sub(self.scroll.min(lines.len().saturating_sub(height)));
        let top = bottom.saturating_sub(height);
        frame.render_widget(Paragraph::new(lines[top..bottom].to_vec()), inner);
    }

    fn render_peers(&self, frame: &mut Frame, area: Rect) {
        let block = Block::default().borders(Borders::TOP).title(" peers ");
        let inner = block.inner(area);
        frame.render_widget(block, area);
        let lines: Vec<Line> = self
            .peers
            .values()
            .flat_map(|g| g.values())
            .map(|p| {
                let (dot, colour) = if p.online { ("●", Color::Green) } else { ("○", Color::DarkGray) };
                Line::from(vec![Span::styled(dot, Style::default().fg(colour)), Span::raw(" "), Span::raw(p.name.clone())])
            })
            .collect();
        frame.render_widget(Paragraph::new(lines), inner);
    }
}

/// "✓✓2 ⏸1": how many copies are in each state, best first.
fn state_marks(states: &BTreeMap<String, DeliveryState>) -> Vec<Span<'static>> {
    let order = [DeliveryState::Read, DeliveryState::Notified, DeliveryState::Delivered, DeliveryState::Held, DeliveryState::Failed];
    let mut spans = Vec::new();
    for state in order {
        let n = states.values().filter(|s| **s == state).count();
        if n == 0 {
            continue;
        }
        let colour = match state {
            DeliveryState::Held => Color::Yellow,
            DeliveryState::Failed => Color::Red,
            _ => Color::Green,
        };
        let count = if states.len() > 1 { n.to_string() } else { String::new() };
        spans.push(Span::styled(format!(" {}{count}", state.symbol()), Style::default().fg(colour)));
    }
    spans
}

fn colour_of(name: &str) -> Color {
    let hash = name.bytes().fold(5381u32, |h, b| h.wrapping_mul(33) ^ u32::from(b));
    SENDER_COLOURS[hash as usize % SENDER_COLOURS.len()]
}

/// Splits text into lines at most `width` columns wide (wide characters count double),
/// breaking at spaces where it can.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for raw in text.lines() {
        let mut line = String::new();
        let mut cols = 0;
        for word in raw.split(' ') {
            let w: usize = word.chars().map(|c| c.width().unwrap_or(0)).sum();
            if cols > 0 && cols + 1 + w > width {
                lines.push(std::mem::take(&mut line));
                cols = 0;
            }
            if cols > 0 {
                line.push(' ');
                cols += 1;
            }
            for c in word.chars() {
                let cw = c.width().unwrap_or(0);
                if cols + cw > width {
                    lines.push(std::mem::take(&mut line));
                    cols = 0;
                }
                line.push(c);
                cols += cw;
            }
        }
        lines.push(line);
    }
    if lines.is_empty() {
        lines.push(String::new());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use relay_proto::PeerRef;
    use unicode_width::UnicodeWidthStr;

    fn event(kind: EventKind, sender: &str, preview: &str) -> Event {
        Event {
            kind,
            id: "m".into(),
            seq: 1,
            group: "team".into(),
            sender: PeerRef { peer_id: format!("p_{sender}"), name: sender.into() },
            sender_kind: Default::default(),
            recipient: None,
            preview: preview.into(),
            time: Utc::now(),
            text: None,
            state: None,
            detail: None,
        }
    }

    /// An app for pane %3, attached to "team" as box:api, connected.
    fn attached_app() -> App {
        let mut app = App::new("%3");
        app.attachments.push(Attachment {
            pane: "%3".into(),
            server: "http://s".into(),
            group: "team".into(),
            peer_id: "p_me".into(),
            display_name: "box:api".into(),
            working_directory: "/w".into(),
        });
        app.connection = Connection::Connected;
        app
    }

    fn screen(app: &App, w: u16, h: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
        terminal.draw(|f| app.render(f)).unwrap();
        let buf = terminal.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..h {
            let mut x = 0;
            while x < w {
                let symbol = buf[(x, y)].symbol();
                out.push_str(symbol);
                // a wide character covers the next cell too
                x += symbol.width().max(1) as u16;
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn wraps_by_display_width() {
        assert_eq!(wrap("hello world again", 11), ["hello world", "again"]);
        assert_eq!(wrap("日本語のテキスト", 6), ["日本語", "のテキ", "スト"]);
        assert_eq!(wrap("averyveryverylongword", 8), ["averyver", "yverylon", "gword"]);
        for line in wrap("mixed 漢字 and ascii words here", 7) {
            assert!(line.width() <= 7, "{line:?}");
        }
    }

    #[test]
    fn shows_identity_messages_dms_and_peers() {
        let mut app = attached_app();
        app.on_event(&event(EventKind::PeerJoined, "bob:web", ""));
        app.on_event(&event(EventKind::Message, "bob:web", "the build is green"));
        app.on_event(&event(EventKind::Dm, "bob:web", "psst"));
        let text = screen(&app, 40, 16);
        for want in ["relay team", "box:api · %3", "connected", "bob:web", "the build is green", "DM", "psst", "● bob:web"] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        app.on_event(&event(EventKind::PeerLeft, "bob:web", ""));
        assert!(!screen(&app, 40, 16).contains("● bob:web"));
    }

    /// The sidebar at a few sizes, compared with the files in `snapshots/`
    /// (UPDATE_SNAPSHOTS=1 rewrites them).
    #[test]
    fn snapshots_at_several_sizes() {
        use chrono::TimeZone;
        let mut app = attached_app();
        app.zone = FixedOffset::east_opt(0).unwrap();
        let at = |min: u32| Utc.with_ymd_and_hms(2026, 11, 25, 9, min, 0).unwrap();
        let mut e = event(EventKind::PeerJoined, "bob:web", "");
        e.time = at(0);
        app.on_event(&e);
        for (min, kind, who, text) in [
            (1, EventKind::Message, "bob:web", "the build is green; merging the API change after lunch"),
            (2, EventKind::Dm, "carol:db", "can you look at the migration? 日本語もOK"),
            (3, EventKind::Message, "bob:web", "done"),
        ] {
            let mut e = event(kind, who, text);
            e.time = at(min);
            app.on_event(&e);
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("snapshots");
        for (w, h) in [(30, 14), (42, 20), (80, 12)] {
            let got = screen(&app, w, h);
            let path = dir.join(format!("sidebar-{w}x{h}.txt"));
            if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &got).unwrap();
            }
            let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (UPDATE_SNAPSHOTS=1 writes it)", path.display()));
            assert_eq!(got, want, "{w}x{h} differs from {}", path.display());
        }
    }

    #[test]
    fn receipts_mark_own_messages_and_never_step_back() {
        let mut app = attached_app();
        let mut mine = event(EventKind::Message, "box:api", "ready for review");
        mine.sender.peer_id = "p_me".into();
        mine.id = "m_mine".into();
        app.on_event(&mine);
        let receipt = |who: &str, state| {
            let mut r = event(EventKind::Receipt, who, "");
            r.id = "m_mine".into();
            r.state = Some(state);
            r
        };
        app.on_event(&receipt("bob", DeliveryState::Delivered));
        app.on_event(&receipt("carol", DeliveryState::Held));
        let text = screen(&app, 40, 12);
        assert!(text.contains("box:api ✓1 ⏸1"), "{text}");
        app.on_event(&receipt("bob", DeliveryState::Read));
        app.on_event(&receipt("bob", DeliveryState::Delivered)); // late, ignored
        app.on_event(&receipt("carol", DeliveryState::Read)); // the human let it in
        let text = screen(&app, 40, 12);
        assert!(text.contains("box:api ✓✓2"), "{text}");
        assert_eq!(text.matches("ready for review").count(), 1, "receipts add no lines");
    }

    #[test]
    fn scrolls_and_quits_on_keys() {
        let mut app = App::new("%3");
        for i in 0..50 {
            app.on_event(&event(EventKind::Message, "a", &format!("line {i}")));
        }
        assert!(screen(&app, 30, 12).contains("line 49"));
        for _ in 0..20 {
            app.on_key(KeyEvent::from(KeyCode::Up));
        }
        let scrolled = screen(&app, 30, 12);
        assert!(!scrolled.contains("line 49") && scrolled.contains("line 39"), "{scrolled}");
        app.on_key(KeyEvent::from(KeyCode::End));
        assert!(screen(&app, 30, 12).contains("line 49"));
        assert!(matches!(app.on_key(KeyEvent::from(KeyCode::Char('q'))), Action::Quit));
    }
}
