//! Following a group's log for this node's streams: an ordered JetStream consumer from
//! the last entry handed on, and the receipt notes other nodes share.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::super::{GroupNews, Result, StoreError};
use super::{Inner, log, nats_error, subject_token};

pub(super) fn note_subject(group_id: &str) -> String {
    format!("relay.note.{}", subject_token(group_id))
}

/// Hands `news` every entry of the group after `last`, and every note shared for it, until
/// `stop`; starts over from the last entry handed on whenever NATS fails under it.
pub(super) async fn follow_group(inner: Arc<Inner>, group_id: String, mut last: u64, news: Arc<dyn GroupNews>, stop: CancellationToken) {
    let mut retry = Duration::from_millis(50);
    while !stop.is_cancelled() {
        let ended = follow_once(&inner, &group_id, &mut last, &*news, &stop).await;
        if stop.is_cancelled() {
            return;
        }
        if let Err(e) = ended {
            tracing::warn!(error = %e, group_id, "following the group's log failed; starting again");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(2));
    }
}

async fn follow_once(inner: &Inner, group_id: &str, last: &mut u64, news: &dyn GroupNews, stop: &CancellationToken) -> Result<()> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let mut notes = inner.client.subscribe(note_subject(group_id)).await.map_err(nats_error)?;
    let consumer = inner
        .log
        .create_consumer(OrderedConfig {
            filter_subject: log::subject(group_id),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: *last + 1 },
            ..Default::default()
        })
        .await
        .map_err(nats_error)?;
    let mut entries = consumer.messages().await.map_err(nats_error)?;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            next = entries.next() => match next {
                Some(Ok(message)) => {
                    let seq = message.info().map_err(nats_error)?.stream_sequence;
                    if seq > *last {
                        // one damaged entry must not stop the group's live feed
                        match log::decode(seq, &message.payload) {
                            Ok(entry) => news.entry(entry),
                            Err(e) => tracing::error!(error = %e, group_id, "skipping a log entry"),
                        }
                        *last = seq;
                    }
                }
                Some(Err(e)) => return Err(nats_error(e)),
                None => return Err(StoreError::Nats("the log's consumer ended".into())),
            },
            note = notes.next() => match note {
                Some(note) => news.note(group_id, &note.payload),
                None => return Err(StoreError::Nats("the notes subscription ended".into())),
            },
        }
    }
}
