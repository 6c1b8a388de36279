//! Limits shared by the nodes (sends per peer, new peers per address, wrong join keys):
//! one token bucket per key in `relay_rates`, taken and given back by compare-and-set.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};

use super::super::{Result, StoreError};
use super::buckets::lost_race;
use super::{Inner, REQUEST_TIMEOUT, json, nats_error, parse, subject_token};
use crate::lock;

/// Send limits a node remembers its last write of before it lets go of the idle ones.
const RATE_SLOTS_KEPT: usize = 100_000;

pub(super) type RateSlot = Arc<tokio::sync::Mutex<Option<(SharedBucket, u64)>>>;

/// A token bucket as the cluster shares it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SharedBucket {
    tokens: f64,
    at: DateTime<Utc>,
}

impl Inner {
    /// Takes a token from the shared bucket by compare-and-set. A node's own takes of one
    /// key queue here, each starting from the revision the last one wrote, so a busy peer
    /// costs one round trip a send rather than a storm of lost races; another node's take
    /// in between only costs a fresh read.
    /// Gives up after [`REQUEST_TIMEOUT`] in all, queueing included: a stalled NATS must
    /// not line a busy peer's sends up one timeout after another.
    pub(super) async fn take_token(&self, key: &str, per_second: f64, burst: u32) -> Result<std::result::Result<(), Duration>> {
        self.change_tokens(key, per_second, burst, -1.0).await
    }

    /// Puts back a token taken for something that turned out not to count.
    pub(super) async fn give_token(&self, key: &str, per_second: f64, burst: u32) -> Result<()> {
        self.change_tokens(key, per_second, burst, 1.0).await.map(drop)
    }

    /// Adds `change` tokens (-1: takes one), within the bucket's `burst`; how long until
    /// the bucket can spare them when it cannot now.
    async fn change_tokens(&self, key: &str, per_second: f64, burst: u32, change: f64) -> Result<std::result::Result<(), Duration>> {
        let changing = self.change_tokens_queued(key, per_second, burst, change);
        match tokio::time::timeout(REQUEST_TIMEOUT, changing).await {
            Ok(changed) => changed,
            Err(_) => Err(StoreError::Nats(format!("the limit {key} took more than {}s to check", REQUEST_TIMEOUT.as_secs()))),
        }
    }

    async fn change_tokens_queued(&self, key: &str, per_second: f64, burst: u32, change: f64) -> Result<std::result::Result<(), Duration>> {
        let key = subject_token(key);
        let slot = {
            let mut slots = lock(&self.rate_slots);
            if slots.len() > RATE_SLOTS_KEPT {
                // only what the bucket itself holds is forgotten: the next take reads it
                slots.retain(|_, slot| Arc::strong_count(slot) > 1);
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let mut known = slot.lock().await;
        loop {
            let (bucket, revision) = match known.take() {
                Some(known) => known,
                None => match self.rates.entry(&key).await.map_err(nats_error)?.filter(|e| e.operation == kv::Operation::Put) {
                    Some(e) => (parse::<SharedBucket>("send limit", &e.value)?, e.revision),
                    None => (SharedBucket { tokens: f64::from(burst), at: Utc::now() }, 0),
                },
            };
            let now = Utc::now();
            let elapsed = now.signed_duration_since(bucket.at).to_std().unwrap_or_default().as_secs_f64();
            let tokens = (bucket.tokens + elapsed * per_second).min(f64::from(burst));
            if tokens + change < 0.0 {
                *known = Some((bucket, revision));
                return Ok(Err(Duration::from_secs_f64(-(tokens + change) / per_second)));
            }
            let taken = SharedBucket { tokens: (tokens + change).min(f64::from(burst)), at: now };
            let written = if revision == 0 {
                let created = self.rates.create(&key, json(&taken)).await;
                created.map_err(|e| lost_race(&e, e.kind() == kv::CreateErrorKind::AlreadyExists))
            } else {
                let updated = self.rates.update(&key, json(&taken), revision).await;
                updated.map_err(|e| lost_race(&e, e.kind() == kv::UpdateErrorKind::WrongLastRevision))
            };
            match written {
                Ok(revision) => {
                    *known = Some((taken, revision));
                    return Ok(Ok(()));
                }
                // another node took one first: read the bucket afresh and count again
                Err(true) => continue,
                Err(false) => return Err(StoreError::Nats(format!("cannot update the send limit of {key}"))),
            }
        }
    }
}
