//! Token hash → principal, for the lookup every call makes.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::lock;
use crate::store::PrincipalId;

/// Tokens remembered before the cache starts over.
const TOKEN_CACHE: usize = 100_000;

/// A token never changes hands, so entries never go stale; the map is cleared whole when it
/// grows too large (one store read per token brings each back).
#[derive(Default)]
pub struct TokenCache(Mutex<HashMap<[u8; 32], PrincipalId>>);

impl TokenCache {
    pub fn get(&self, hash: &[u8; 32]) -> Option<PrincipalId> {
        lock(&self.0).get(hash).copied()
    }

    pub fn insert(&self, hash: [u8; 32], principal: PrincipalId) {
        let mut known = lock(&self.0);
        if known.len() >= TOKEN_CACHE {
            known.clear();
        }
        known.insert(hash, principal);
    }
}
