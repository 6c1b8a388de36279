//! Tokens, ids and join keys. Tokens are random and only their SHA-256 is stored; join keys
//! are chosen by people, so they get a slow password hash (Argon2id).

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use sha2::{Digest, Sha256};

/// Every peer token starts with this, so a leaked one is easy to recognise and grep for.
pub const TOKEN_PREFIX: &str = "rly_";

fn random<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    buf
}

/// A fresh bearer token: 256 random bits.
pub fn new_token() -> String {
    format!("{TOKEN_PREFIX}{}", hex::encode(random::<32>()))
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A short random id with a readable prefix (`p_` peers, `m_` messages).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(random::<6>()))
}

pub fn hash_join_key(key: &str) -> String {
    Argon2::default().hash_password(key.as_bytes()).expect("argon2 with default parameters cannot fail").to_string()
}

pub fn join_key_matches(key: &str, hash: &str) -> bool {
    Argon2::default().verify_password(key.as_bytes(), hash).is_ok()
}

/// The token of an `Authorization: Bearer …` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, value) = header.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn join_keys_verify_only_themselves() {
        let h = hash_join_key("open sesame");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(join_key_matches("open sesame", &h));
        assert!(!join_key_matches("open sesame!", &h));
        assert!(!join_key_matches("open sesame", "not a hash"));
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }

    #[test]
    fn ids_have_prefixes() {
        let id = new_id("p_");
        assert!(id.starts_with("p_") && id.len() == 14);
    }
}
