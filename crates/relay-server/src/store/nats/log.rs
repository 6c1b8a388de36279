//! The group logs: one JetStream stream, one subject per group. An entry's sequence number
//! is its stream sequence, the same on every node and every NATS server, so it is the SSE
//! id clients resume from. Within a group the numbers rise but are not consecutive.

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::stream;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use relay_proto::{EventKind, PeerKind};
use serde::{Deserialize, Serialize};

use super::super::{LogEntry, LogQuery, NewEntry, Result, StoreError};
use super::{LOG_STREAM, nats_error, subject_token};

/// Entries read per request when reading forward.
const PAGE: usize = 256;
/// How long a read may take before it fails.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub fn subject(group_id: &str) -> String {
    format!("relay.log.{}", subject_token(group_id))
}

/// An entry as it travels and rests in the stream; the sequence number is the stream's.
#[derive(Serialize, Deserialize)]
struct Wire {
    group_id: String,
    id: String,
    kind: EventKind,
    sender_id: String,
    sender_name: String,
    #[serde(default, skip_serializing_if = "PeerKind::is_agent")]
    sender_kind: PeerKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recipient_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    recipient_name: Option<String>,
    body: String,
    created_at: DateTime<Utc>,
}

pub fn encode(entry: &NewEntry) -> Bytes {
    let wire = Wire {
        group_id: entry.group_id.clone(),
        id: entry.id.clone(),
        kind: entry.kind,
        sender_id: entry.sender_id.clone(),
        sender_name: entry.sender_name.clone(),
        sender_kind: entry.sender_kind,
        recipient_id: entry.recipient_id.clone(),
        recipient_name: entry.recipient_name.clone(),
        body: entry.body.clone(),
        created_at: entry.created_at,
    };
    serde_json::to_vec(&wire).expect("entries serialize").into()
}

pub fn decode(seq: u64, payload: &[u8]) -> Result<LogEntry> {
    let w: Wire = serde_json::from_slice(payload).map_err(|e| StoreError::Corrupt(format!("log entry {seq}: {e}")))?;
    Ok(LogEntry {
        group_id: w.group_id,
        seq,
        id: w.id,
        kind: w.kind,
        sender_id: w.sender_id,
        sender_name: w.sender_name,
        sender_kind: w.sender_kind,
        recipient_id: w.recipient_id,
        recipient_name: w.recipient_name,
        body: w.body,
        created_at: w.created_at,
    })
}

/// One direct-get request that may answer with several messages (NATS 2.11's batch and
/// multi-last forms, which the client library does not offer): every message up to the
/// end-of-batch status, as (stream sequence, payload). A request without `batch` or
/// `multi_last` gets one answer and no end-of-batch.
async fn direct_batch(client: &Client, request: serde_json::Value) -> Result<Vec<(u64, Bytes)>> {
    let batched = request.get("batch").is_some() || request.get("multi_last").is_some();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.map_err(nats_error)?;
    client.publish_with_reply(format!("$JS.API.DIRECT.GET.{LOG_STREAM}"), inbox, request.to_string().into()).await.map_err(nats_error)?;
    let mut out = Vec::new();
    loop {
        let reply = tokio::time::timeout(READ_TIMEOUT, replies.next())
            .await
            .map_err(|_| StoreError::Nats("reading the log timed out".into()))?
            .ok_or_else(|| StoreError::Nats("the connection closed while reading the log".into()))?;
        match reply.status.map(|s| s.as_u16()) {
            None | Some(200) => {}
            // end of batch; nothing (more) to read
            Some(204 | 404) => break,
            Some(code) => {
                return Err(StoreError::Nats(format!("reading the log failed: {code} {}", reply.description.unwrap_or_default())));
            }
        }
        let seq = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Sequence"))
            .and_then(|v| v.as_str().parse().ok())
            .ok_or_else(|| StoreError::Nats("a log read answered without a sequence number".into()))?;
        out.push((seq, reply.payload));
        if !batched {
            break;
        }
    }
    Ok(out)
}

/// The group's newest entry at or before `up_to`: (stream sequence, payload).
pub async fn last_at_or_before(client: &Client, group_id: &str, up_to: Option<u64>) -> Result<Option<(u64, Bytes)>> {
    let request = match up_to {
        Some(0) => return Ok(None),
        Some(up_to) => serde_json::json!({ "multi_last": [subject(group_id)], "up_to_seq": up_to, "batch": 1 }),
        None => serde_json::json!({ "last_by_subj": subject(group_id) }),
    };
    Ok(direct_batch(client, request).await?.into_iter().next())
}

/// Reads the entries `query` asks for.
///
/// Pages come from any replica, which may lag the leader by a moment. A reader that
/// names where it must get to (`up_to_seq`: an entry it saw live, the head it was given)
/// asks the leader whether anything lies between the page's end and that point.
pub async fn entries(client: &Client, log: &stream::Stream, q: &LogQuery) -> Result<Vec<LogEntry>> {
    let mut out = Vec::new();
    if q.limit == 0 {
        return Ok(out);
    }
    if q.newest_first {
        // one step back at a time: the stream cannot be read backwards in pages
        let mut cursor = q.up_to_seq;
        while cursor.is_none_or(|c| c > q.after_seq) {
            let Some((seq, payload)) = last_at_or_before(client, &q.group_id, cursor).await? else { break };
            if seq <= q.after_seq {
                break;
            }
            let entry = decode(seq, &payload)?;
            if q.matches(&entry) {
                out.push(entry);
                if out.len() == q.limit {
                    break;
                }
            }
            cursor = Some(seq - 1);
        }
        return Ok(out);
    }
    let subject = subject(&q.group_id);
    let mut next = q.after_seq + 1;
    loop {
        let request = serde_json::json!({ "seq": next, "next_by_subj": subject, "batch": PAGE });
        let mut page = direct_batch(client, request).await?;
        let full = page.len() == PAGE;
        let mut lagged = false;
        if !full && let Some(up_to) = q.up_to_seq.filter(|up_to| page.last().map_or(next, |(seq, _)| seq + 1) <= *up_to) {
            let after = page.last().map_or(next, |(seq, _)| seq + 1);
            match log.raw_message_builder().sequence(after).next_by_subject(subject.clone()).send().await {
                Ok(message) if message.sequence <= up_to => {
                    // the replica lags: this page is not the end
                    page.push((message.sequence, message.payload));
                    lagged = true;
                }
                Ok(_) => {}
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(nats_error(e)),
            }
        }
        for (seq, payload) in page {
            if q.up_to_seq.is_some_and(|up_to| seq > up_to) {
                return Ok(out);
            }
            let entry = decode(seq, &payload)?;
            if q.matches(&entry) {
                out.push(entry);
                if out.len() == q.limit {
                    return Ok(out);
                }
            }
            next = seq + 1;
        }
        if !full && !lagged {
            return Ok(out);
        }
    }
}
