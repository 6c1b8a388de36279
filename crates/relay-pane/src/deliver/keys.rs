//! Delivery into the agent by keystrokes: one fixed-template line per burst of events,
//! typed only when the pane can take it. Message content never reaches the terminal; only
//! sanitized sender and group names do.

use std::time::Duration;

use relay_proto::{DeliveryState, Event, EventKind, Receipt};
use relay_tmux::Tmux;

/// Longest sender or group name typed into a pane.
const MAX_NAME: usize = 40;
/// Senders named in one line before "and N more".
const MAX_SENDERS: usize = 3;
/// Between the text and its Enter: sent together, agents sometimes lose the Enter.
pub const ENTER_DELAY: Duration = Duration::from_millis(150);

/// A name made safe to type: printable ASCII of a known set, bounded. Anything else (escape
/// sequences, control characters, tmux key syntax) becomes '?'.
pub fn sanitize(name: &str) -> String {
    let mut out: String =
        name.chars().take(MAX_NAME).map(|c| if c.is_ascii_alphanumeric() || "._-:@/+".contains(c) { c } else { '?' }).collect();
    if name.chars().count() > MAX_NAME {
        out.push('~');
    }
    if out.is_empty() { "?".to_owned() } else { out }
}

/// The line that announces a burst of events, or None when none of them is a message.
/// When all of them are reminders (announced before, still unread), it says so.
pub fn announcement(events: &[Event], is_reminder: &dyn Fn(&str) -> bool) -> Option<String> {
    let messages: Vec<&Event> = events.iter().filter(|e| matches!(e.kind, EventKind::Message | EventKind::Dm)).collect();
    if messages.is_empty() {
        return None;
    }
    let mut groups: Vec<String> = messages.iter().map(|e| sanitize(&e.group)).collect();
    groups.dedup();
    let mut senders: Vec<String> = Vec::new();
    for e in &messages {
        let mut s = sanitize(&e.sender.name);
        if e.sender_kind == relay_proto::PeerKind::Human {
            s.push_str(" (human)");
        }
        if !senders.contains(&s) {
            senders.push(s);
        }
    }
    let more = senders.len().saturating_sub(MAX_SENDERS);
    senders.truncate(MAX_SENDERS);
    let mut from = senders.join(", ");
    if more > 0 {
        from.push_str(&format!(" and {more} more"));
    }
    let dms = messages.iter().filter(|e| e.kind == EventKind::Dm).count();
    let n = messages.len();
    let what = match (n, dms) {
        (1, 1) => "1 new DM".to_owned(),
        (1, _) => "1 new message".to_owned(),
        (n, 0) => format!("{n} new messages"),
        (n, d) => format!("{n} new messages ({d} DM)"),
    };
    if messages.iter().all(|e| is_reminder(&e.id)) {
        let what = what.replacen(" new ", " unread ", 1);
        return Some(format!("[RELAY] Reminder: {what} in {} from {from}. Use read_new_messages.", groups.join(", ")));
    }
    Some(format!("[RELAY] {what} in {} from {from}. Use read_new_messages.", groups.join(", ")))
}

/// What a pane showed, and since when it has shown it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screen {
    pub text: String,
    pub cursor: (u32, u32),
    pub since: std::time::Instant,
}

/// How careful typing is.
#[derive(Debug, Clone, Copy)]
pub struct Care {
    /// The pane's screen must stay unchanged this long (no output, no key echo).
    pub quiet: Duration,
    /// How long the typed line may take to show before relay gives up on it.
    pub shown_within: Duration,
}

impl Default for Care {
    fn default() -> Self {
        Self { quiet: Duration::from_millis(250), shown_within: Duration::from_secs(1) }
    }
}

/// What happened to an attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Typed,
    /// Not now, and why (copy mode, the agent working, someone typing); try again later.
    Busy(String),
}

/// Types `line` into `pane` only when it can take it: not in copy mode, the agent idle (by
/// Claude Code's own `status` when known, else a screen that stays still for `care.quiet`),
/// and nothing half-typed on the input line. Presses Enter only once the line shows.
pub async fn type_line(
    tmux: &dyn Tmux,
    pane: &str,
    line: &str,
    care: Care,
    agent_status: Option<&str>,
    seen: Option<&Screen>,
) -> Result<Outcome, relay_tmux::TmuxError> {
    let before = relay_tmux::pane(tmux, pane)?;
    if before.in_mode {
        return Ok(Outcome::Busy("the pane is in copy mode".into()));
    }
    if let Some(status) = agent_status.filter(|s| *s != "idle") {
        return Ok(Outcome::Busy(format!("the agent is {status}")));
    }
    let screen = relay_tmux::capture(tmux, pane)?;
    if let Some(typed) = pending_input(&screen, before.cursor) {
        return Ok(Outcome::Busy(format!("someone is typing in the pane ({} characters)", typed.chars().count())));
    }
    // unchanged since it was last looked at, long enough ago: quiet already
    let quiet_already = seen.is_some_and(|s| s.text == screen && s.cursor == before.cursor && s.since.elapsed() >= care.quiet);
    if !quiet_already {
        tokio::time::sleep(care.quiet).await;
        let after = relay_tmux::pane(tmux, pane)?;
        if after.in_mode || after.cursor != before.cursor || relay_tmux::capture(tmux, pane)? != screen {
            return Ok(Outcome::Busy("the pane is busy (its screen keeps changing)".into()));
        }
    }
    // an earlier identical line may still be on screen: wait for one more
    let shown_before = relay_tmux::capture_joined(tmux, pane)?.matches(line).count();
    relay_tmux::send_literal(tmux, pane, line)?;
    let deadline = tokio::time::Instant::now() + care.shown_within;
    while relay_tmux::capture_joined(tmux, pane)?.matches(line).count() <= shown_before {
        if tokio::time::Instant::now() >= deadline {
            return Ok(Outcome::Busy("the typed line did not show in the pane".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(ENTER_DELAY).await;
    relay_tmux::send_enter(tmux, pane)?;
    Ok(Outcome::Typed)
}

/// What became of a burst handed to the [`Typist`].
#[derive(Debug, PartialEq, Eq)]
pub enum Announced {
    /// Typed and submitted: these messages reached the agent.
    Typed(Vec<Receipt>),
    /// Not yet; try again at this time. Says why.
    Later(tokio::time::Instant, String),
    /// Kept failing for longer than the patience allows: these messages failed.
    GaveUp(Vec<Receipt>, String),
}

/// Announces bursts by keystrokes, retrying with backoff while the pane is busy, and
/// giving up (so the human can be told) after `patience`.
pub struct Typist {
    pub care: Care,
    pub patience: Duration,
    blocked_since: Option<tokio::time::Instant>,
    attempts: u32,
    seen: Option<Screen>,
}

impl Typist {
    pub fn new(care: Care, patience: Duration) -> Self {
        Self { care, patience, blocked_since: None, attempts: 0, seen: None }
    }

    /// Looks at the pane (every few seconds), so one that has not changed since can be
    /// typed into without first waiting out the quiet period.
    pub fn observe(&mut self, tmux: &dyn Tmux, pane: &str) {
        let (Ok(info), Ok(text)) = (relay_tmux::pane(tmux, pane), relay_tmux::capture(tmux, pane)) else { return };
        if self.seen.as_ref().is_some_and(|s| s.text == text && s.cursor == info.cursor) {
            return;
        }
        self.seen = Some(Screen { text, cursor: info.cursor, since: std::time::Instant::now() });
    }

    /// One careful attempt at typing `line` (not an announcement: no backoff, no giving up).
    pub async fn type_once(
        &self,
        tmux: &dyn Tmux,
        pane: &str,
        line: &str,
        agent_status: Option<&str>,
    ) -> Result<Outcome, relay_tmux::TmuxError> {
        type_line(tmux, pane, line, self.care, agent_status, self.seen.as_ref()).await
    }

    /// One attempt at announcing `pending` (left empty unless it must wait).
    pub async fn announce(
        &mut self,
        tmux: &dyn Tmux,
        pane: &str,
        pending: &mut Vec<Event>,
        is_reminder: &dyn Fn(&str) -> bool,
        agent_status: Option<&str>,
    ) -> Announced {
        let receipts = |pending: &mut Vec<Event>, state, detail: Option<&str>| -> Vec<Receipt> {
            pending
                .drain(..)
                .filter(|e| e.kind.message_kind().is_some())
                .map(|e| Receipt { message_id: e.id, group: e.group, state, detail: detail.map(str::to_owned) })
                .collect()
        };
        let Some(line) = announcement(pending, is_reminder) else {
            pending.clear();
            return Announced::Typed(Vec::new());
        };
        let why = match type_line(tmux, pane, &line, self.care, agent_status, self.seen.as_ref()).await {
            Ok(Outcome::Typed) => {
                self.blocked_since = None;
                self.attempts = 0;
                return Announced::Typed(receipts(pending, DeliveryState::Notified, None));
            }
            Ok(Outcome::Busy(why)) => why,
            Err(e) => format!("cannot type into {pane}: {e}"),
        };
        let now = tokio::time::Instant::now();
        let since = *self.blocked_since.get_or_insert(now);
        if now.duration_since(since) >= self.patience {
            self.blocked_since = None;
            self.attempts = 0;
            let detail = format!("could not be typed into the agent's pane: {why}");
            return Announced::GaveUp(receipts(pending, DeliveryState::Failed, Some(&detail)), why);
        }
        self.attempts += 1;
        // 0.5 s, 1 s, 2 s, … at most 10 s between attempts
        let backoff = Duration::from_millis(500 * 2u64.pow(self.attempts.min(5) - 1)).min(Duration::from_secs(10));
        Announced::Later(now + backoff, why)
    }
}

/// Text someone has typed but not submitted: what stands left of the cursor on its line,
/// once the usual prompt marks are taken off.
pub fn pending_input(screen: &str, (x, y): (u32, u32)) -> Option<String> {
    let row = screen.lines().nth(y as usize)?;
    let before_cursor: String = row.chars().take(x as usize).collect();
    let typed = before_cursor.trim_start_matches(|c: char| c.is_whitespace() || "│|>❯›»$%#:".contains(c)).trim_end();
    (!typed.is_empty()).then(|| typed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use relay_proto::PeerRef;
    use relay_tmux::FakeTmux;

    fn event(kind: EventKind, sender: &str, group: &str) -> Event {
        Event {
            kind,
            id: "m".into(),
            seq: 1,
            group: group.into(),
            sender: PeerRef { peer_id: "p".into(), name: sender.into() },
            sender_kind: Default::default(),
            recipient: None,
            preview: "rm -rf / # never typed".into(),
            time: Utc::now(),
            text: None,
            state: None,
            detail: None,
        }
    }

    #[test]
    fn names_are_made_safe_to_type() {
        assert_eq!(sanitize("box:api"), "box:api");
        assert_eq!(sanitize("evil\u{1b}[2J;C-c Enter"), "evil??2J?C-c?Enter");
        assert_eq!(sanitize("tab\tnew\nline"), "tab?new?line");
        assert_eq!(sanitize(&"x".repeat(100)).len(), MAX_NAME + 1);
        assert_eq!(sanitize(""), "?");
        assert_eq!(sanitize("ünï"), "?n?");
        for hostile in ["a\rb", "$(rm -rf ~)", "`id`", "x;y", "C-c", "M-x", "\u{202e}evil", "مرحبا", "🤖bot", "a\u{0}b", "\u{7f}"] {
            let safe = sanitize(hostile);
            assert!(safe.chars().all(|c| c.is_ascii_graphic()), "{hostile:?} became {safe:?}");
            assert!(!safe.contains(['$', '`', ';', '(', ')', '\r', '\u{1b}', ' ']), "{hostile:?} became {safe:?}");
        }
    }

    #[test]
    fn bursts_become_one_line_without_content() {
        let burst = [
            event(EventKind::Message, "alice:api", "mygroup"),
            event(EventKind::PeerJoined, "carol:db", "mygroup"),
            event(EventKind::Message, "bob:web", "mygroup"),
            event(EventKind::Message, "alice:api", "mygroup"),
        ];
        assert_eq!(
            announcement(&burst, &|_: &str| false).unwrap(),
            "[RELAY] 3 new messages in mygroup from alice:api, bob:web. Use read_new_messages."
        );
        assert_eq!(
            announcement(&[event(EventKind::Dm, "bob:web", "g")], &|_: &str| false).unwrap(),
            "[RELAY] 1 new DM in g from bob:web. Use read_new_messages."
        );
        let mixed = [event(EventKind::Dm, "a", "g"), event(EventKind::Message, "b", "g")];
        assert_eq!(announcement(&mixed, &|_: &str| false).unwrap(), "[RELAY] 2 new messages (1 DM) in g from a, b. Use read_new_messages.");
        let many: Vec<Event> = (0..6).map(|i| event(EventKind::Message, &format!("p{i}"), "g")).collect();
        assert!(announcement(&many, &|_: &str| false).unwrap().contains("from p0, p1, p2 and 3 more."));
        assert_eq!(announcement(&[event(EventKind::PeerLeft, "x", "g")], &|_: &str| false), None);
        let reminded = |id: &str| mixed.iter().any(|e| e.id == id);
        assert_eq!(
            announcement(&mixed, &reminded).unwrap(),
            "[RELAY] Reminder: 2 unread messages (1 DM) in g from a, b. Use read_new_messages."
        );
        for e in [&burst[..], &mixed[..]] {
            assert!(!announcement(e, &|_: &str| false).unwrap().contains("rm -rf"), "content must never be typed");
        }
        // hostile names: the line stays one printable ASCII line
        let hostile = [event(EventKind::Message, "\u{1b}]0;pwned\u{7}C-c\rEnter", "g"), event(EventKind::Dm, &"🤖".repeat(200), "g")];
        let line = announcement(&hostile, &|_: &str| false).unwrap();
        assert!(line.chars().all(|c| c == ' ' || c.is_ascii_graphic()), "{line:?}");
        assert!(line.len() < 200, "{line}");
    }

    /// A pane for FakeTmux: `%3`, in copy mode or not, cursor at (x, y).
    fn pane_info(in_mode: bool, cursor: (u32, u32)) -> String {
        format!("%3\t1\tclaude\t/w\ts:0.0\t{}\t80\t{}\t{}\n", u8::from(in_mode), cursor.0, cursor.1)
    }

    const QUICK: Care = Care { quiet: Duration::from_millis(1), shown_within: Duration::from_millis(50) };

    #[tokio::test]
    async fn types_only_into_an_idle_pane_and_enter_comes_once_the_line_shows() {
        let tmux = FakeTmux::default();
        tmux.answer("display-message", Ok(&pane_info(true, (0, 0))));
        assert_eq!(type_line(&tmux, "%3", "[RELAY] x", QUICK, None, None).await.unwrap(), Outcome::Busy("the pane is in copy mode".into()));
        assert_eq!(tmux.calls().len(), 1, "nothing typed in copy mode");

        let tmux = FakeTmux::default();
        tmux.answer("display-message", Ok(&pane_info(false, (0, 0))));
        let busy = type_line(&tmux, "%3", "[RELAY] x", QUICK, Some("busy"), None).await.unwrap();
        assert_eq!(busy, Outcome::Busy("the agent is busy".into()));

        // a human's half-typed line: wait
        let tmux = FakeTmux::default();
        tmux.answer("display-message", Ok(&pane_info(false, (14, 1))));
        tmux.answer("capture-pane", Ok("earlier output\n> git push --fo\n"));
        let typing = type_line(&tmux, "%3", "[RELAY] x", QUICK, None, None).await.unwrap();
        assert_eq!(typing, Outcome::Busy("someone is typing in the pane (12 characters)".into()));
        assert!(!tmux.calls().iter().any(|c| c[0] == "send-keys"));

        // output still coming: wait
        let tmux = FakeTmux::default();
        tmux.answer("display-message", Ok(&pane_info(false, (0, 1))));
        tmux.answer("capture-pane", Ok("building…\n\n"));
        tmux.answer("display-message", Ok(&pane_info(false, (0, 2))));
        tmux.answer("capture-pane", Ok("building…\ndone\n\n"));
        let working = type_line(&tmux, "%3", "[RELAY] x", QUICK, None, None).await.unwrap();
        assert_eq!(working, Outcome::Busy("the pane is busy (its screen keeps changing)".into()));

        // idle: typed, checked on screen, then Enter on its own
        let tmux = FakeTmux::default();
        for _ in 0..2 {
            tmux.answer("display-message", Ok(&pane_info(false, (2, 1))));
            tmux.answer("capture-pane", Ok("ok\n> \n"));
        }
        tmux.answer("capture-pane", Ok("ok\n> \n")); // before typing: no such line yet
        tmux.answer("capture-pane", Ok("ok\n> [RELAY] x\n"));
        assert_eq!(type_line(&tmux, "%3", "[RELAY] x", QUICK, Some("idle"), None).await.unwrap(), Outcome::Typed);
        let calls = tmux.calls();
        let keys: Vec<&Vec<String>> = calls.iter().filter(|c| c[0] == "send-keys").collect();
        assert_eq!(keys, [&vec!["send-keys", "-t", "%3", "-l", "--", "[RELAY] x"], &vec!["send-keys", "-t", "%3", "Enter"]]);
        assert_eq!(calls.last().unwrap(), keys[1], "Enter comes last, after the line showed");

        // typed, but it never shows: no Enter
        let tmux = FakeTmux::default();
        for _ in 0..2 {
            tmux.answer("display-message", Ok(&pane_info(false, (0, 0))));
            tmux.answer("capture-pane", Ok("\n"));
        }
        let lost = type_line(&tmux, "%3", "[RELAY] x", QUICK, None, None).await.unwrap();
        assert_eq!(lost, Outcome::Busy("the typed line did not show in the pane".into()));
        assert!(!tmux.calls().iter().any(|c| c.len() == 4 && c[3] == "Enter"), "no Enter for a line that did not show");
    }

    #[tokio::test]
    async fn a_pane_seen_unchanged_long_enough_is_typed_into_at_once() {
        let slow = Care { quiet: Duration::from_secs(3600), shown_within: Duration::from_millis(50) };
        let tmux = FakeTmux::default();
        tmux.answer("display-message", Ok(&pane_info(false, (2, 1))));
        tmux.answer("capture-pane", Ok("ok\n> \n"));
        tmux.answer("capture-pane", Ok("ok\n> \n"));
        tmux.answer("capture-pane", Ok("ok\n> [RELAY] x\n"));
        let seen = Screen { text: "ok\n> \n".into(), cursor: (2, 1), since: std::time::Instant::now() - Duration::from_secs(7200) };
        let started = std::time::Instant::now();
        assert_eq!(type_line(&tmux, "%3", "[RELAY] x", slow, None, Some(&seen)).await.unwrap(), Outcome::Typed);
        assert!(started.elapsed() < Duration::from_secs(5), "no quiet period to wait out");
        // seen too recently, or something else: the quiet period applies
        let recent = Screen { since: std::time::Instant::now(), ..seen };
        let quick = Care { quiet: Duration::from_millis(1), ..slow };
        let tmux = FakeTmux::default();
        tmux.answer("display-message", Ok(&pane_info(false, (2, 1))));
        tmux.answer("capture-pane", Ok("ok\n> \n"));
        tmux.answer("display-message", Ok(&pane_info(false, (2, 1))));
        tmux.answer("capture-pane", Ok("ok\n> changed\n"));
        let busy = type_line(&tmux, "%3", "[RELAY] x", quick, None, Some(&recent)).await.unwrap();
        assert_eq!(busy, Outcome::Busy("the pane is busy (its screen keeps changing)".into()));
    }

    #[tokio::test]
    async fn the_typist_backs_off_then_gives_up_with_failed_receipts() {
        let tmux = FakeTmux::default();
        let mut typist = Typist::new(QUICK, Duration::from_millis(30));
        let mut pending = vec![event(EventKind::Dm, "bob", "g")];
        for _ in 0..3 {
            tmux.answer("display-message", Ok(&pane_info(true, (0, 0))));
        }
        let Announced::Later(_, why) = typist.announce(&tmux, "%3", &mut pending, &|_: &str| false, None).await else {
            panic!("should wait")
        };
        assert_eq!(why, "the pane is in copy mode");
        assert_eq!(pending.len(), 1, "kept for the next attempt");
        tokio::time::sleep(Duration::from_millis(40)).await;
        match typist.announce(&tmux, "%3", &mut pending, &|_: &str| false, None).await {
            Announced::GaveUp(receipts, why) => {
                assert_eq!(why, "the pane is in copy mode");
                assert_eq!(receipts.len(), 1);
                assert_eq!(receipts[0].state, DeliveryState::Failed);
                assert!(receipts[0].detail.as_deref().unwrap().contains("copy mode"));
            }
            other => panic!("should give up: {other:?}"),
        }
        assert!(pending.is_empty());
    }

    #[test]
    fn half_typed_input_is_told_from_a_bare_prompt() {
        assert_eq!(pending_input("> \n", (2, 0)), None);
        assert_eq!(pending_input("│ > \n", (4, 0)), None);
        assert_eq!(pending_input("❯ \n", (2, 0)), None);
        assert_eq!(pending_input("\n\n", (0, 1)), None);
        assert_eq!(pending_input("│ > fix the tests\n", (16, 0)).as_deref(), Some("fix the test"));
        assert_eq!(pending_input("hello\n", (5, 0)).as_deref(), Some("hello"));
        assert_eq!(pending_input("out\n$ ls -la\n", (8, 1)).as_deref(), Some("ls -la"));
        assert_eq!(pending_input("", (0, 5)), None);
    }
}
