//! Reminders. A message the agent was told of but has not read after a while is announced
//! once more; if it stays unread, the human gets a desktop notification. Never a loop: at
//! most `max_per_hour` reminders for one sender's messages in any hour, past which the
//! human is told instead.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use relay_proto::Event;

struct Watch {
    event: Event,
    since: Instant,
    reminded: bool,
}

/// What is due now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Announce these again.
    pub remind: Vec<Event>,
    /// Still unread after a reminder (or too many reminders): tell the human.
    pub tell_human: Vec<Event>,
}

pub struct Renotifier {
    after: Duration,
    max_per_hour: usize,
    watching: HashMap<String, Watch>,
    /// When each sender's messages last woke the agent, within the hour.
    wakeups: HashMap<String, VecDeque<Instant>>,
}

const HOUR: Duration = Duration::from_secs(3600);

impl Renotifier {
    pub fn new(after: Duration, max_per_hour: usize) -> Self {
        Self { after, max_per_hour, watching: HashMap::new(), wakeups: HashMap::new() }
    }

    /// The agent was told of `event` at `now`: watch it until it is read.
    pub fn notified(&mut self, event: &Event, now: Instant) {
        self.watching.entry(event.id.clone()).or_insert_with(|| Watch { event: event.clone(), since: now, reminded: false });
    }

    /// Read (or failed, or held for the human): no reminder.
    pub fn settled(&mut self, id: &str) {
        self.watching.remove(id);
    }

    /// Whether `id` was announced once more and is still unread.
    pub fn is_reminder(&self, id: &str) -> bool {
        self.watching.get(id).is_some_and(|w| w.reminded)
    }

    /// Whether `id` is still waiting to be read.
    pub fn watches(&self, id: &str) -> bool {
        self.watching.contains_key(id)
    }

    pub fn is_watching(&self) -> bool {
        !self.watching.is_empty()
    }

    pub fn due(&mut self, now: Instant) -> Due {
        let mut due = Due::default();
        // oldest first, so the budget goes to the messages that waited longest
        let mut ripe: Vec<(Instant, chrono::DateTime<chrono::Utc>, String)> = self
            .watching
            .iter()
            .filter(|(_, w)| now.duration_since(w.since) >= self.after)
            .map(|(id, w)| (w.since, w.event.time, id.clone()))
            .collect();
        ripe.sort();
        for (_, _, id) in ripe {
            let Some(mut watch) = self.watching.remove(&id) else { continue };
            let sender = watch.event.sender.peer_id.clone();
            let recent = self.wakeups.entry(sender).or_default();
            while recent.front().is_some_and(|t| now.duration_since(*t) >= HOUR) {
                recent.pop_front();
            }
            if watch.reminded || recent.len() >= self.max_per_hour {
                due.tell_human.push(watch.event);
                continue;
            }
            recent.push_back(now);
            watch.reminded = true;
            watch.since = now;
            due.remind.push(watch.event.clone());
            self.watching.insert(id, watch);
        }
        let by_time = |e: &Event| (e.time, e.id.clone());
        due.remind.sort_by_key(by_time);
        due.tell_human.sort_by_key(by_time);
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use relay_proto::{EventKind, PeerRef};

    fn message(id: &str, from: &str) -> Event {
        Event {
            kind: EventKind::Dm,
            id: id.into(),
            seq: 1,
            group: "g".into(),
            sender: PeerRef { peer_id: from.into(), name: from.into() },
            sender_kind: Default::default(),
            recipient: None,
            preview: String::new(),
            time: Utc::now(),
            text: None,
            state: None,
            detail: None,
        }
    }

    fn ids(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn one_reminder_then_the_human_and_nothing_for_what_was_read() {
        let t0 = Instant::now();
        let min = Duration::from_secs(60);
        let mut r = Renotifier::new(10 * min, 6);
        r.notified(&message("m1", "alice"), t0);
        r.notified(&message("m2", "alice"), t0);
        r.notified(&message("m1", "alice"), t0 + min); // told again: still counts from t0
        assert_eq!(r.due(t0 + 9 * min), Due::default());
        r.settled("m2");
        assert!(!r.is_reminder("m1"));
        let due = r.due(t0 + 10 * min);
        assert_eq!((ids(&due.remind), ids(&due.tell_human)), (vec!["m1"], vec![]));
        assert!(r.is_reminder("m1") && r.watches("m1"));
        assert_eq!(r.due(t0 + 19 * min), Due::default(), "the reminder restarts the clock");
        let due = r.due(t0 + 20 * min);
        assert_eq!((ids(&due.remind), ids(&due.tell_human)), (vec![], vec!["m1"]));
        assert!(!r.is_watching() && !r.is_reminder("m1"), "told the human: done");
        assert_eq!(r.due(t0 + 60 * min), Due::default());
    }

    #[test]
    fn at_most_so_many_reminders_per_sender_per_hour() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Renotifier::new(s, 2);
        for i in 0..3 {
            r.notified(&message(&format!("a{i}"), "alice"), t0);
        }
        r.notified(&message("b0", "bob"), t0);
        let due = r.due(t0 + s);
        assert_eq!(due.remind.len(), 3, "two of alice's, one of bob's: {:?}", ids(&due.remind));
        assert_eq!(due.tell_human.len(), 1, "alice's third goes to the human at once");
        // within the hour alice's budget is spent; after it, reminders come again
        r.notified(&message("a9", "alice"), t0 + 2 * s);
        let mut told = ids(&r.due(t0 + 3 * s).tell_human).into_iter().map(str::to_owned).collect::<Vec<_>>();
        told.sort();
        assert_eq!(told, ["a0", "a1", "a9", "b0"], "the reminded ones, and alice's over budget");
        r.notified(&message("a10", "alice"), t0 + HOUR);
        assert_eq!(ids(&r.due(t0 + HOUR + s).remind), ["a10"]);
    }
}
