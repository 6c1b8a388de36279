//! Token buckets: sends per peer, new peers per client address, wrong join keys per group.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// Buckets kept before the full ones (the same as none) are let go.
const PRUNE_ABOVE: usize = 100_000;

pub struct Buckets<K> {
    pub per_second: f64,
    pub burst: u32,
    map: Mutex<HashMap<K, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst, map: Mutex::default() }
    }

    /// Takes a token from `key`'s bucket; else how long until one is there.
    pub fn take(&self, key: &K) -> Result<(), Duration> {
        self.with(key, |bucket| {
            if bucket.tokens >= 1.0 {
                bucket.tokens -= 1.0;
                return true;
            }
            false
        })
    }

    /// Puts back a token taken for something that turned out not to count.
    pub fn give_back(&self, key: &K) {
        if let Some(bucket) = lock(&self.map).get_mut(key) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst as f64);
        }
    }

    /// Whether `key`'s bucket has a token, leaving it there.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.with(key, |bucket| bucket.tokens >= 1.0)
    }

    /// Refills `key`'s bucket to now and lets `f` decide; the wait for a token when it says no.
    fn with(&self, key: &K, f: impl FnOnce(&mut Bucket) -> bool) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = lock(&self.map);
        if map.len() > PRUNE_ABOVE {
            map.retain(|_, b| self.refilled(b, now) < self.burst as f64);
        }
        let bucket = map.entry(key.clone()).or_insert(Bucket { tokens: self.burst as f64, at: now });
        bucket.tokens = self.refilled(bucket, now);
        bucket.at = now;
        if f(bucket) {
            return Ok(());
        }
        let wait = if self.per_second > 0.0 { (1.0 - bucket.tokens) / self.per_second } else { f64::from(u32::MAX) };
        Err(Duration::from_secs_f64(wait.max(0.001)))
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.per_second).min(self.burst as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_refills_at_its_rate() {
        let buckets = Buckets::new(1000.0, 3);
        for _ in 0..3 {
            assert!(buckets.take(&"a").is_ok());
        }
        let wait = buckets.take(&"a").unwrap_err();
        assert!(wait <= Duration::from_millis(2), "{wait:?}");
        assert!(buckets.check(&"b").is_ok(), "buckets are per key");
        std::thread::sleep(Duration::from_millis(5));
        assert!(buckets.check(&"a").is_ok() && buckets.check(&"a").is_ok(), "check takes nothing");
        assert!(buckets.take(&"a").is_ok());
    }
}
