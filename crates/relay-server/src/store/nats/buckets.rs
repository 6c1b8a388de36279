//! Opening the buckets, and the compare-and-set outcomes every writer to them shares.

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use super::super::{Result, StoreError};
use super::nats_error;

/// Opens a bucket, creating it when missing. Its reads go to the stream's leader: a
/// replica may lag a write another node made a moment ago, and a registration, a
/// compare-and-set or a message's status must see it.
pub(super) async fn open_bucket(js: jetstream::Context, config: kv::Config) -> Result<kv::Store> {
    let name = config.bucket.clone();
    let failed = |e: &dyn std::fmt::Display| StoreError::Nats(format!("cannot open the bucket {name}: {e}"));
    if js.get_key_value(&name).await.is_err() {
        js.create_key_value(config).await.map_err(|e| failed(&e))?;
    }
    let mut stream = js.get_stream(format!("KV_{name}")).await.map_err(|e| failed(&e))?;
    let mut stream_config = stream.info().await.map_err(|e| failed(&e))?.config.clone();
    if stream_config.allow_direct {
        stream_config.allow_direct = false;
        js.update_stream(stream_config).await.map_err(|e| failed(&e))?;
    }
    js.get_key_value(&name).await.map_err(|e| failed(&e))
}

/// Whether a compare-and-set failed because another writer came first (`kind_says`), or
/// the JetStream leader refused it for the same reason under a code the client library
/// does not map (10164, "wrong last sequence", seen when two nodes write one key at once).
pub(super) fn lost_race(e: &dyn std::fmt::Display, kind_says: bool) -> bool {
    kind_says || e.to_string().contains("wrong last sequence")
}

/// Creates `key` in `bucket`; an existing key is a [`StoreError::Conflict`] named `what`.
pub(super) async fn create(bucket: &kv::Store, key: String, value: Bytes, what: String) -> Result<()> {
    match bucket.create(key, value).await {
        Ok(_) => Ok(()),
        Err(e) if lost_race(&e, e.kind() == kv::CreateErrorKind::AlreadyExists) => Err(StoreError::Conflict(what)),
        Err(e) => Err(nats_error(e)),
    }
}
