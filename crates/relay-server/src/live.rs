//! What a group's open streams receive as it happens, and how much of it stays in memory.
//!
//! A group's channel holds up to `stream_buffer` events for its slowest reader. Were those
//! the messages themselves, one reader that stops reading would pin them all: 1,024 messages
//! of 64 KB with their frames came to ~460 MB per group, and groups are free to make. So the
//! channel carries weak references, and the messages themselves are kept by [`Recent`]: the
//! newest entries server-wide, within `live_buffer_bytes` and [`RECENT_FOR`]. A reader that
//! meets an entry no longer kept reads it from the store instead.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::relay::ReceiptNote;
use crate::store::LogEntry;

/// Entries older than this are left to the store: a stream that keeps up took them long ago.
pub const RECENT_FOR: Duration = Duration::from_secs(10);

/// What travels on a group's live channel to its open streams.
#[derive(Debug, Clone)]
pub enum Live {
    Entry(LiveRef),
    Receipt(Arc<ReceiptNote>),
}

/// A new log entry: its sequence number, and the entry while [`Recent`] keeps it.
#[derive(Debug, Clone)]
pub struct LiveRef {
    pub seq: u64,
    pub entry: Weak<LiveEntry>,
}

/// A new log entry on its way to a group's streams.
#[derive(Debug)]
pub struct LiveEntry {
    pub entry: Arc<LogEntry>,
    /// Its SSE frame, made once by the first stream that sends it: for peers (a preview)
    /// and for daemons (the whole text). A hundred streams, one serialization, no copies.
    pub frames: [OnceLock<Bytes>; 2],
}

impl LiveEntry {
    /// What the entry may come to hold with both frames made: the text, its JSON-escaped
    /// copy in the daemons' frame (up to six bytes for one), and the fields around them.
    fn weight(&self) -> usize {
        self.entry.body.len() * 7 + 1024
    }
}

/// The newest live entries, server-wide, within a byte budget.
pub struct Recent {
    budget: usize,
    held: usize,
    entries: VecDeque<(Arc<LiveEntry>, usize, Instant)>,
}

impl Recent {
    pub fn new(budget: usize) -> Self {
        Self { budget, held: 0, entries: VecDeque::new() }
    }

    /// Keeps `entry` for the streams, letting go of what is over budget or old; the
    /// reference the channel carries.
    pub fn keep(&mut self, entry: LiveEntry) -> LiveRef {
        let now = Instant::now();
        let seq = entry.entry.seq;
        let weight = entry.weight();
        let entry = Arc::new(entry);
        let reference = LiveRef { seq, entry: Arc::downgrade(&entry) };
        self.held += weight;
        self.entries.push_back((entry, weight, now));
        // (the newest stays, even alone over budget: its readers are on their way)
        while self.entries.len() > 1
            && let Some((_, weight, at)) = self.entries.front()
            && (self.held > self.budget || now.duration_since(*at) > RECENT_FOR)
        {
            self.held -= weight;
            self.entries.pop_front();
        }
        reference
    }

    /// Bytes the kept entries may come to.
    pub fn held(&self) -> usize {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, body: usize) -> LiveEntry {
        let entry = LogEntry {
            group_id: "g".into(),
            seq,
            id: format!("m_{seq}"),
            kind: relay_proto::EventKind::Message,
            sender_id: "p_1".into(),
            sender_name: "box:a".into(),
            recipient_id: None,
            recipient_name: None,
            body: "x".repeat(body),
            created_at: chrono::DateTime::default(),
        };
        LiveEntry { entry: Arc::new(entry), frames: Default::default() }
    }

    #[test]
    fn the_newest_entries_are_kept_within_the_budget() {
        let mut recent = Recent::new(100_000);
        let refs: Vec<LiveRef> = (1..=20).map(|seq| recent.keep(entry(seq, 4_000))).collect();
        // 29,024 bytes each: the newest three fit
        let kept: Vec<u64> = refs.iter().filter(|r| r.entry.upgrade().is_some()).map(|r| r.seq).collect();
        assert_eq!(kept, [18, 19, 20]);
        assert!(recent.held() <= 100_000);
        // one entry over the whole budget is still kept, alone
        let big = recent.keep(entry(21, 50_000));
        assert!(big.entry.upgrade().is_some());
        assert_eq!(refs.iter().filter(|r| r.entry.upgrade().is_some()).count(), 0);
    }
}
