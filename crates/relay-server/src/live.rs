//! What a group's open streams receive as it happens, and how much of it stays in memory.
//!
//! A group's channel holds up to `stream_buffer` events for its slowest reader. Were those
//! the messages themselves, one reader that stops reading would pin them all: 1,024 messages
//! of 64 KB with their frames came to ~460 MB per group, and groups are free to make. So the
//! channel carries weak references, and the messages themselves are kept by [`Recent`]: the
//! newest entries server-wide, within `live_buffer_bytes` and [`RECENT_FOR`]. A reader that
//! meets an entry no longer kept reads it from the store instead.
//!
//! On a single node the sender hands each new entry to [`Fanout::entry`] as it commits it.
//! In a cluster every node, the sender's included, learns of new entries and receipts by
//! following the shared store ([`Store::follow`]), so each group's streams see one order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::lock;
use crate::metrics::Metrics;
use crate::relay::ReceiptNote;
use crate::store::{Following, GroupNews, LogEntry, Store, StoreError};

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

/// Every group with open streams on this node, and what they are sent.
pub struct Fanout {
    channels: Mutex<HashMap<String, Channel>>,
    /// The new entries the channels refer to (taken inside `channels`).
    recent: Mutex<Recent>,
    metrics: Arc<Metrics>,
    buffer: usize,
}

struct Channel {
    tx: broadcast::Sender<Live>,
    /// The newest entry sent: a store that follows may repeat older ones after a reconnect.
    last_seq: u64,
    /// Present while a shared store feeds this channel; dropping it stops the feed.
    _following: Option<Following>,
}

/// The channels, locked: the single-node sender holds this across its commit so entries
/// leave in sequence order.
pub struct Channels<'a> {
    fanout: &'a Fanout,
    map: MutexGuard<'a, HashMap<String, Channel>>,
}

impl Fanout {
    pub fn new(buffer: usize, live_buffer_bytes: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { channels: Mutex::default(), recent: Mutex::new(Recent::new(live_buffer_bytes)), metrics, buffer: buffer.max(1) })
    }

    pub fn lock(&self) -> Channels<'_> {
        Channels { fanout: self, map: lock(&self.channels) }
    }

    /// A receiver of the group's live events, and the sequence number they follow: every
    /// entry after it arrives on the receiver, everything up to it is in the store.
    pub fn subscribe(self: &Arc<Self>, store: &dyn Store, group_id: &str) -> Result<(broadcast::Receiver<Live>, u64), StoreError> {
        // A shared store is asked before the lock is taken: its follower takes the lock on
        // the NATS client's thread, which an answer through that store would wait for.
        let shared_head = if store.shared() { Some(store.head_seq(group_id)?) } else { None };
        let mut channels = self.lock();
        let head = match shared_head {
            Some(head) => head,
            None => store.head_seq(group_id)?,
        };
        if let Some(channel) = channels.map.get(group_id) {
            // (a replica may know an older head than this node has already sent on)
            return Ok((channel.tx.subscribe(), head.max(channel.last_seq)));
        }
        let (tx, rx) = broadcast::channel(self.buffer);
        let news: Arc<dyn GroupNews> = Arc::new(News { fanout: Arc::downgrade(self) });
        let following = if store.shared() { Some(store.follow(group_id, head, news)?) } else { None };
        channels.map.insert(group_id.to_owned(), Channel { tx, last_seq: head, _following: following });
        Ok((rx, head))
    }

    /// Lets go of a group no stream listens to any longer (and stops following it).
    pub fn release(&self, group_id: &str) {
        let mut channels = self.lock();
        if channels.map.get(group_id).is_some_and(|c| c.tx.receiver_count() == 0) {
            channels.map.remove(group_id);
        }
    }

    /// Sends a receipt to the group's streams on this node.
    pub fn receipt(&self, group_id: &str, note: Arc<ReceiptNote>) {
        if let Some(channel) = self.lock().map.get(group_id) {
            let _ = channel.tx.send(Live::Receipt(note));
        }
    }
}

impl Channels<'_> {
    /// Sends a new entry to its group's streams on this node, unless they had it already.
    pub fn entry(&mut self, entry: Arc<LogEntry>) {
        let Some(channel) = self.map.get_mut(&entry.group_id) else { return };
        if entry.seq <= channel.last_seq {
            return;
        }
        channel.last_seq = entry.seq;
        let reference = {
            let mut recent = lock(&self.fanout.recent);
            let reference = recent.keep(LiveEntry { entry: entry.clone(), frames: Default::default() });
            self.fanout.metrics.live_bytes(recent.held());
            reference
        };
        if channel.tx.send(Live::Entry(reference)).is_err() {
            self.map.remove(&entry.group_id);
        }
    }
}

/// What a shared store tells this node about a group it follows.
struct News {
    fanout: Weak<Fanout>,
}

impl GroupNews for News {
    fn entry(&self, entry: LogEntry) {
        if let Some(fanout) = self.fanout.upgrade() {
            fanout.lock().entry(Arc::new(entry));
        }
    }

    fn note(&self, group_id: &str, note: &[u8]) {
        let Some(fanout) = self.fanout.upgrade() else { return };
        match serde_json::from_slice::<ReceiptNote>(note) {
            Ok(note) => fanout.receipt(group_id, Arc::new(note)),
            Err(e) => tracing::warn!(error = %e, group_id, "dropping a receipt note another node shared"),
        }
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
            sender_kind: Default::default(),
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
