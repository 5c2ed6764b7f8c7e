//! The pre-shared key, and the nonces of the handshake.
//!
//! The handshake itself (the source proves first, both proofs bound to the
//! transcript and the TLS session) is [`ferry_proto::handshake`], run by
//! [`crate::conn::Conn::client_handshake`] and
//! [`crate::conn::Conn::server_authenticate`]. Proofs are HMAC-SHA256 under
//! the key, compared in constant time; fresh 32-byte nonces on both sides
//! make a recorded exchange useless, and the role labels stop a reflection
//! of one side's proof as the other's.

use crate::error::{Result, TransportError};

/// Shortest key accepted.
pub const MIN_KEY_LEN: usize = 16;

/// A pre-shared key.
#[derive(Clone)]
pub struct AuthKey(Vec<u8>);

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey({} bytes)", self.0.len())
    }
}

impl AuthKey {
    /// Wraps key bytes; refuses keys shorter than [`MIN_KEY_LEN`].
    pub fn new(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(TransportError::Invalid {
                field: "auth key",
                detail: format!("{} bytes, need at least {MIN_KEY_LEN}", bytes.len()),
            });
        }
        Ok(AuthKey(bytes))
    }

    /// Reads a key file: its content with surrounding whitespace removed.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| TransportError::Io {
            context: format!("cannot read auth key file {}", path.display()),
            source: e,
        })?;
        let trimmed = raw.trim_ascii().to_vec();
        Self::new(trimmed)
    }

    /// A random key (used by `ferry demo`, where both ends share a process).
    pub fn random() -> Self {
        let mut k = vec![0u8; 32];
        rand::fill(&mut k[..]);
        AuthKey(k)
    }

    /// The keys of the session whose handshake exchanged `nonce_s` (the
    /// source's) and `nonce_d` (the destination's).
    pub fn session_keys(&self, nonce_s: &[u8; 32], nonce_d: &[u8; 32]) -> ferry_proto::SessionKeys {
        ferry_proto::SessionKeys::derive(&self.0, nonce_s, nonce_d)
    }

    /// The key bytes (the handshake proofs key, [`crate::conn`]).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::fill(&mut n);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused() {
        assert!(AuthKey::new(vec![0; 8])
            .unwrap_err()
            .to_string()
            .contains("at least 16"));
    }
}
