//! Leases: a name held by one node at a time, for the few writes that must not interleave
//! across nodes (two registrations of one agent, or of one name, in one group). A lease is
//! a key in the bucket `relay_leases`, created only if absent and deleted when let go; the
//! bucket's own age limit ends one whose node died holding it, on the NATS servers' clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::runtime::Handle;

use super::super::{Result, StoreError};
use super::buckets::lost_race;
use super::{Inner, nats_error};

/// How long a lease lasts unless let go (the bucket's max age): far longer than the writes
/// it covers take.
pub(super) const LEASE_FOR: Duration = Duration::from_secs(5);
/// How long a node waits for a lease before the call fails.
const WAIT_AT_MOST: Duration = Duration::from_secs(10);
/// How often a held lease is asked for again.
const RETRY_EVERY: Duration = Duration::from_millis(5);

/// A held lease; dropping it lets go.
pub(super) struct Lease {
    inner: Arc<Inner>,
    handle: Handle,
    key: String,
    revision: u64,
}

impl Inner {
    /// Waits until this node holds `key`; the revision that says so.
    pub(super) async fn take_lease(&self, key: &str) -> Result<u64> {
        let started = Instant::now();
        loop {
            // the value only says who holds it, for whoever looks
            match self.leases.create(key, Bytes::from(self.presence.node.clone())).await {
                Ok(revision) => return Ok(revision),
                Err(e) if lost_race(&e, e.kind() == kv::CreateErrorKind::AlreadyExists) => {}
                Err(e) => return Err(nats_error(e)),
            }
            if started.elapsed() > WAIT_AT_MOST {
                return Err(StoreError::Nats(format!("{key} stayed held by another node for over {}s", WAIT_AT_MOST.as_secs())));
            }
            tokio::time::sleep(RETRY_EVERY).await;
        }
    }
}

impl Lease {
    pub(super) fn new(inner: Arc<Inner>, handle: Handle, key: String, revision: u64) -> Self {
        Self { inner, handle, key, revision }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (inner, key, revision) = (self.inner.clone(), std::mem::take(&mut self.key), self.revision);
        // only the lease this node took: one that ran out and was taken since is another's
        self.handle.spawn(async move {
            if let Err(e) = inner.leases.delete_expect_revision(&key, Some(revision)).await
                && !lost_race(&e, false)
            {
                tracing::warn!(error = %e, key, "could not let go of a lease; it runs out by itself");
            }
        });
    }
}
