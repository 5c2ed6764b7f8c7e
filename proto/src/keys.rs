//! Session keys: everything keyed in one migration comes from the
//! pre-shared key and the two handshake nonces, through HKDF-SHA256.
//!
//! ```text
//! prk          = HKDF-Extract(salt = "ferry session v2" | nonce_s | nonce_d, ikm = K)
//! page secret  = HKDF-Expand(prk, "ferry page hash",   192)   keyed XXH3-128 of each page
//! mix secret   = HKDF-Expand(prk, "ferry page mix",    192)   (address, page hash) -> contribution
//! frame        = HKDF-Expand(prk, "ferry frame mac",    32)   data-frame header and payload tags
//! control s->d = HKDF-Expand(prk, "ferry control s2d",  32)   control messages, source to destination
//! control d->s = HKDF-Expand(prk, "ferry control d2s",  32)   control messages, destination to source
//! commit       = HKDF-Expand(prk, "ferry commit",       32)   Ready / Commit / Committed
//! data channel = HKDF-Expand(prk, "ferry data channel", 32)   data-channel admission
//! ```
//!
//! Both nonces are fresh per connection, so every migration has its own
//! keys: nothing recorded in one can be replayed into another, and the
//! evidence of one migration says nothing about another's. Both sides derive
//! the same keys once mutual authentication has succeeded; neither key
//! ever travels.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of an XXH3 secret (the library needs at least 136).
pub const SECRET_LEN: usize = 192;

/// An HMAC-SHA256 key for one purpose.
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// Wraps raw key bytes (tests and fuzzing; sessions use [`SessionKeys`]).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MacKey(bytes)
    }

    fn hmac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for p in parts {
            // Length-prefixed, so that part boundaries are unambiguous.
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }

    /// HMAC-SHA256 over the length-prefixed `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.hmac(parts).finalize().into_bytes().into()
    }

    /// The first 16 bytes of [`MacKey::mac`]: the tag carried in frames.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; 16] {
        let m = self.mac(parts);
        let mut t = [0u8; 16];
        t.copy_from_slice(&m[..16]);
        t
    }

    /// Checks a full 32-byte MAC in constant time.
    pub fn verify(&self, parts: &[&[u8]], mac: &[u8; 32]) -> bool {
        self.hmac(parts).verify_slice(mac).is_ok()
    }

    /// Checks a 16-byte tag in constant time.
    pub fn verify_tag(&self, parts: &[&[u8]], tag: &[u8; 16]) -> bool {
        self.hmac(parts).verify_truncated_left(tag).is_ok()
    }
}

/// The keys of one page hash: the XXH3 secret that hashes a page's bytes
/// and the one that binds the hash to the page's address (see
/// [`crate::evidence`]).
#[derive(Clone)]
pub struct PageKey {
    pub(crate) page: [u8; SECRET_LEN],
    pub(crate) mix: [u8; SECRET_LEN],
}

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKey(..)")
    }
}

impl PageKey {
    /// A page key from explicit secrets (tests; sessions use [`SessionKeys`]).
    pub fn from_secrets(page: [u8; SECRET_LEN], mix: [u8; SECRET_LEN]) -> Self {
        PageKey { page, mix }
    }
}

/// Every key of one migration session.
#[derive(Clone, Debug)]
pub struct SessionKeys {
    /// Page hashes and their contributions to the evidence.
    pub page: PageKey,
    /// Data-frame tags: the header tag checked before a page lands, the
    /// payload tag checked after.
    pub frame: MacKey,
    /// Control messages from the source.
    pub control_s2d: MacKey,
    /// Control messages from the destination.
    pub control_d2s: MacKey,
    /// The switchover: `Ready`, `Commit`, `Committed` bind the transcript,
    /// the evidence and the device state to the session.
    pub commit: MacKey,
    /// Data channels prove they belong to this session with it.
    pub data_channel: MacKey,
}

impl SessionKeys {
    /// Derives the session's keys from the pre-shared key and the two
    /// handshake nonces (source's first).
    pub fn derive(psk: &[u8], nonce_s: &[u8; 32], nonce_d: &[u8; 32]) -> Self {
        let mut salt = Vec::with_capacity(16 + 64);
        salt.extend_from_slice(b"ferry session v2");
        salt.extend_from_slice(nonce_s);
        salt.extend_from_slice(nonce_d);
        let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
        let expand = |label: &[u8], out: &mut [u8]| {
            hk.expand(label, out)
                .expect("HKDF-SHA256 expands up to 8160 bytes");
        };
        let mut page = [0u8; SECRET_LEN];
        let mut mix = [0u8; SECRET_LEN];
        expand(b"ferry page hash", &mut page);
        expand(b"ferry page mix", &mut mix);
        let key = |label: &[u8]| {
            let mut k = [0u8; 32];
            expand(label, &mut k);
            MacKey(k)
        };
        SessionKeys {
            page: PageKey { page, mix },
            frame: key(b"ferry frame mac"),
            control_s2d: key(b"ferry control s2d"),
            control_d2s: key(b"ferry control d2s"),
            commit: key(b"ferry commit"),
            data_channel: key(b"ferry data channel"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_keys_and_any_input_changes_them() {
        let (ns, nd) = ([1u8; 32], [2u8; 32]);
        let a = SessionKeys::derive(b"0123456789abcdef0123456789abcdef", &ns, &nd);
        let b = SessionKeys::derive(b"0123456789abcdef0123456789abcdef", &ns, &nd);
        assert_eq!(a.frame.0, b.frame.0);
        assert_eq!(a.page.page, b.page.page);
        let other_key = SessionKeys::derive(b"0123456789abcdef0123456789abcdeX", &ns, &nd);
        let other_nonce = SessionKeys::derive(b"0123456789abcdef0123456789abcdef", &nd, &ns);
        for k in [&other_key, &other_nonce] {
            assert_ne!(a.frame.0, k.frame.0);
            assert_ne!(a.commit.0, k.commit.0);
            assert_ne!(a.page.page, k.page.page);
        }
        // Purposes never share a key.
        let all = [
            a.frame.0,
            a.control_s2d.0,
            a.control_d2s.0,
            a.commit.0,
            a.data_channel.0,
        ];
        for i in 0..all.len() {
            for j in i + 1..all.len() {
                assert_ne!(all[i], all[j]);
            }
        }
        assert_ne!(a.page.page, a.page.mix);
    }

    #[test]
    fn macs_bind_every_part_and_its_boundaries() {
        let k = MacKey::from_bytes([9; 32]);
        let m = k.mac(&[b"ab", b"c"]);
        assert!(k.verify(&[b"ab", b"c"], &m));
        assert!(!k.verify(&[b"a", b"bc"], &m), "boundaries are bound");
        assert!(!MacKey::from_bytes([8; 32]).verify(&[b"ab", b"c"], &m));
        let t = k.tag(&[b"x"]);
        assert!(k.verify_tag(&[b"x"], &t));
        assert!(!k.verify_tag(&[b"y"], &t));
    }
}
