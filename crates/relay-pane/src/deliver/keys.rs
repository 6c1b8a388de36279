//! Delivery into the agent by keystrokes: one fixed-template line per burst of events,
//! typed only when the pane can take it. Message content never reaches the terminal; only
//! sanitized sender and group names do.

use std::time::Duration;

use relay_proto::{Event, EventKind};
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
    let mut out: String = name
        .chars()
        .take(MAX_NAME)
        .map(|c| if c.is_ascii_alphanumeric() || "._-:@/+".contains(c) { c } else { '?' })
        .collect();
    if name.chars().count() > MAX_NAME {
        out.push('~');
    }
    if out.is_empty() { "?".to_owned() } else { out }
}

/// The line that announces a burst of events, or None when none of them is a message.
pub fn announcement(events: &[Event]) -> Option<String> {
    let messages: Vec<&Event> = events.iter().filter(|e| matches!(e.kind, EventKind::Message | EventKind::Dm)).collect();
    if messages.is_empty() {
        return None;
    }
    let mut groups: Vec<String> = messages.iter().map(|e| sanitize(&e.group)).collect();
    groups.dedup();
    let mut senders: Vec<String> = Vec::new();
    for e in &messages {
        let s = sanitize(&e.sender.name);
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
    Some(format!("[RELAY] {what} in {} from {from}. Use read_new_messages.", groups.join(", ")))
}

/// What happened to an attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Typed,
    /// The pane is in copy mode (or another mode); try again later.
    Busy,
}

/// Types `line` into `pane` unless it is in a mode; then Enter, separately.
pub async fn type_line(tmux: &dyn Tmux, pane: &str, line: &str) -> Result<Outcome, relay_tmux::TmuxError> {
    if relay_tmux::pane(tmux, pane)?.in_mode {
        return Ok(Outcome::Busy);
    }
    relay_tmux::send_literal(tmux, pane, line)?;
    tokio::time::sleep(ENTER_DELAY).await;
    relay_tmux::send_enter(tmux, pane)?;
    Ok(Outcome::Typed)
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
        assert_eq!(announcement(&burst).unwrap(), "[RELAY] 3 new messages in mygroup from alice:api, bob:web. Use read_new_messages.");
        assert_eq!(announcement(&[event(EventKind::Dm, "bob:web", "g")]).unwrap(), "[RELAY] 1 new DM in g from bob:web. Use read_new_messages.");
        let mixed = [event(EventKind::Dm, "a", "g"), event(EventKind::Message, "b", "g")];
        assert_eq!(announcement(&mixed).unwrap(), "[RELAY] 2 new messages (1 DM) in g from a, b. Use read_new_messages.");
        let many: Vec<Event> = (0..6).map(|i| event(EventKind::Message, &format!("p{i}"), "g")).collect();
        assert!(announcement(&many).unwrap().contains("from p0, p1, p2 and 3 more."));
        assert_eq!(announcement(&[event(EventKind::PeerLeft, "x", "g")]), None);
        for e in [&burst[..], &mixed[..]] {
            assert!(!announcement(e).unwrap().contains("rm -rf"), "content must never be typed");
        }
        // hostile names: the line stays one printable ASCII line
        let hostile = [event(EventKind::Message, "\u{1b}]0;pwned\u{7}C-c\rEnter", "g"), event(EventKind::Dm, &"🤖".repeat(200), "g")];
        let line = announcement(&hostile).unwrap();
        assert!(line.chars().all(|c| c == ' ' || c.is_ascii_graphic()), "{line:?}");
        assert!(line.len() < 200, "{line}");
    }

    #[tokio::test]
    async fn copy_mode_is_never_typed_into_and_enter_comes_separately() {
        let tmux = FakeTmux::default();
        tmux.answer("display-message", Ok("%3\t1\tclaude\t/w\ts:0.0\t1\t80\n"));
        assert_eq!(type_line(&tmux, "%3", "[RELAY] x").await.unwrap(), Outcome::Busy);
        assert_eq!(tmux.calls().len(), 1, "nothing typed in copy mode");
        tmux.answer("display-message", Ok("%3\t1\tclaude\t/w\ts:0.0\t0\t80\n"));
        assert_eq!(type_line(&tmux, "%3", "[RELAY] x").await.unwrap(), Outcome::Typed);
        let calls = tmux.calls();
        assert_eq!(calls[2], ["send-keys", "-t", "%3", "-l", "--", "[RELAY] x"]);
        assert_eq!(calls[3], ["send-keys", "-t", "%3", "Enter"]);
    }
}
