//! Mutual authentication with a pre-shared key.
//!
//! Challenge-response with HMAC-SHA256, before anything else is accepted:
//!
//! 1. source → destination: `Hello { nonce_s }`
//! 2. destination → source: `HelloReply { nonce_d, proof_d = HMAC(K, "ferry-v1 destination" ‖ nonce_s ‖ nonce_d) }`
//! 3. the source checks `proof_d`, then sends `Auth { proof_s = HMAC(K, "ferry-v1 source" ‖ nonce_d ‖ nonce_s) }`
//! 4. the destination checks `proof_s` and answers `Welcome`.
//!
//! Fresh 32-byte random nonces on both sides make a recorded exchange useless
//! for a replay; the role labels stop a reflection of one side's proof as the
//! other's. Proofs are compared in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

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

/// Which side computes a proof.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The migration source.
    Source,
    /// The migration destination.
    Destination,
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

    /// The key bytes (for deriving the TLS identity, [`crate::tls`]).
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self, side: Side, theirs: &[u8; 32], mine: &[u8; 32]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(match side {
            Side::Source => b"ferry-v1 source",
            Side::Destination => b"ferry-v1 destination",
        });
        mac.update(theirs);
        mac.update(mine);
        mac
    }

    /// The proof `side` sends, for the peer's challenge `theirs` and its own `mine`.
    pub fn proof(&self, side: Side, theirs: &[u8; 32], mine: &[u8; 32]) -> [u8; 32] {
        self.mac(side, theirs, mine).finalize().into_bytes().into()
    }

    /// Checks a peer's proof in constant time.
    pub fn verify(&self, side: Side, theirs: &[u8; 32], mine: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(side, theirs, mine).verify_slice(proof).is_ok()
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
    fn proofs_verify_only_with_the_same_key_role_and_nonces() {
        let k = AuthKey::new(vec![1; 32]).unwrap();
        let other = AuthKey::new(vec![2; 32]).unwrap();
        let (ns, nd) = (nonce(), nonce());
        let p = k.proof(Side::Destination, &ns, &nd);
        assert!(k.verify(Side::Destination, &ns, &nd, &p));
        assert!(!other.verify(Side::Destination, &ns, &nd, &p), "wrong key");
        assert!(!k.verify(Side::Source, &ns, &nd, &p), "reflected role");
        assert!(
            !k.verify(Side::Destination, &nonce(), &nd, &p),
            "replayed with new challenge"
        );
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(AuthKey::new(vec![0; 8])
            .unwrap_err()
            .to_string()
            .contains("at least 16"));
    }
}
