//! The handshake's proofs and the tags that authenticate every control
//! message after it.
//!
//! # Handshake (protocol versions 2 and 3)
//!
//! Source S, destination D, pre-shared key K. `binding` is the TLS
//! exporter value of the connection (RFC 8446 §7.5, label
//! [`BINDING_LABEL`], 32 bytes), or empty on a plaintext connection.
//! `T` is the pair of running SHA-256 hashes of every frame each side sent
//! so far (source to destination first), as both sides hold them.
//!
//! ```text
//! S -> D  Hello      { versions, role, nonce_s }
//! D -> S  HelloReply { version, nonce_d }          nothing derived from K
//! S -> D  Auth       { proof_s = HMAC(K, "ferry v2 source" | binding | T) }
//! D       checks proof_s; a wrong one is answered Reject(Auth)
//! D -> S  Welcome    { proof_d = HMAC(K, "ferry v2 destination" | binding | T) }
//! S       checks proof_d before it sends anything else
//! ```
//!
//! The source proves itself first: a stranger who connects to a
//! destination gets a random nonce and a refusal, nothing that would let
//! it test a guess of the key offline. (Whoever the source connects to
//! gets `proof_s`, which would; the key is 32 random bytes for that
//! reason, see `ferry gen-key`.) Each proof covers every handshake frame
//! before it, so a changed version range, role or nonce fails the proof;
//! the binding ties it to the TLS session, so a relay between two TLS
//! sessions fails it too. Both sides then derive the session keys from K
//! and both nonces ([`crate::keys::SessionKeys::derive`]).
//!
//! Data channels run the same exchange with the session's `data_channel`
//! key in place of K ([`data_proof`]): a channel proves it belongs to one
//! authenticated session without any token crossing the network.
//!
//! # Control-message tags
//!
//! After `Welcome` every control frame in each direction carries a 16-byte
//! tag ([`ControlTags`]): HMAC-SHA256 with that direction's key
//! (`control_s2d`, `control_d2s`) over the frame's sequence number in its
//! direction (from 0), its header and its body, truncated to 16 bytes.
//! A changed, dropped, replayed or reordered message fails its tag, in
//! plaintext mode as in TLS.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::keys::MacKey;

/// TLS exporter label of the channel binding.
pub const BINDING_LABEL: &[u8] = b"EXPORTER-ferry-channel-binding";
/// Bytes of the channel binding taken from a TLS session.
pub const BINDING_LEN: usize = 32;
/// Bytes of a control-message tag.
pub const TAG_LEN: usize = 16;

/// Who sends a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prover {
    /// The migration source (it proves first).
    Source,
    /// The migration destination.
    Destination,
}

/// Which exchange a proof belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    Control,
    Data,
}

fn label(ex: Exchange, who: Prover) -> &'static [u8] {
    match (ex, who) {
        (Exchange::Control, Prover::Source) => b"ferry v2 source",
        (Exchange::Control, Prover::Destination) => b"ferry v2 destination",
        (Exchange::Data, Prover::Source) => b"ferry v2 data channel source",
        (Exchange::Data, Prover::Destination) => b"ferry v2 data channel destination",
    }
}

/// The handshake so far, as both sides see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeView<'a> {
    /// The connection's channel binding (empty on plaintext).
    pub binding: &'a [u8],
    /// SHA-256 of every frame the source sent so far.
    pub s2d: [u8; 32],
    /// SHA-256 of every frame the destination sent so far.
    pub d2s: [u8; 32],
}

fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(&(p.len() as u64).to_le_bytes());
        m.update(p);
    }
    m
}

fn parts<'a>(ex: Exchange, who: Prover, v: &'a HandshakeView<'a>) -> [&'a [u8]; 4] {
    [label(ex, who), v.binding, &v.s2d, &v.d2s]
}

/// The control-connection proof `who` sends, keyed with the pre-shared key.
pub fn key_proof(psk: &[u8], who: Prover, view: &HandshakeView<'_>) -> [u8; 32] {
    hmac_parts(psk, &parts(Exchange::Control, who, view))
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a control-connection proof in constant time.
pub fn verify_key_proof(
    psk: &[u8],
    who: Prover,
    view: &HandshakeView<'_>,
    proof: &[u8; 32],
) -> bool {
    hmac_parts(psk, &parts(Exchange::Control, who, view))
        .verify_slice(proof)
        .is_ok()
}

/// The data-channel proof `who` sends, keyed with the session's
/// `data_channel` key.
pub fn data_proof(key: &MacKey, who: Prover, view: &HandshakeView<'_>) -> [u8; 32] {
    key.mac(&parts(Exchange::Data, who, view))
}

/// Checks a data-channel proof in constant time.
pub fn verify_data_proof(
    key: &MacKey,
    who: Prover,
    view: &HandshakeView<'_>,
    proof: &[u8; 32],
) -> bool {
    key.verify(&parts(Exchange::Data, who, view), proof)
}

/// A control message whose tag does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadTag {
    /// Its sequence number in its direction.
    pub seq: u64,
}

/// The tags of one direction of a control connection: the sender seals,
/// the receiver opens, each counting frames from 0.
#[derive(Debug, Clone)]
pub struct ControlTags {
    key: MacKey,
    seq: u64,
}

impl ControlTags {
    /// Tags keyed with `key` (a direction's control key), from frame 0.
    pub fn new(key: MacKey) -> Self {
        ControlTags { key, seq: 0 }
    }

    /// The sequence number of the next frame.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The tag of the next frame sent (`header` and `body` exactly as
    /// they go on the wire).
    pub fn seal(&mut self, header: &[u8], body: &[u8]) -> [u8; TAG_LEN] {
        let t = self.key.tag(&[&self.seq.to_le_bytes(), header, body]);
        self.seq += 1;
        t
    }

    /// Checks the next frame received. A failure leaves the count where it
    /// was: the connection is not to be used after it.
    pub fn open(&mut self, header: &[u8], body: &[u8], tag: &[u8; TAG_LEN]) -> Result<(), BadTag> {
        if self
            .key
            .verify_tag(&[&self.seq.to_le_bytes(), header, body], tag)
        {
            self.seq += 1;
            Ok(())
        } else {
            Err(BadTag { seq: self.seq })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(binding: &[u8]) -> HandshakeView<'_> {
        HandshakeView {
            binding,
            s2d: [1; 32],
            d2s: [2; 32],
        }
    }

    #[test]
    fn key_proofs_bind_the_key_the_prover_the_binding_and_both_transcripts() {
        let k = b"0123456789abcdef0123456789abcdef";
        let v = view(b"tls session A");
        let p = key_proof(k, Prover::Source, &v);
        assert!(verify_key_proof(k, Prover::Source, &v, &p));
        assert!(!verify_key_proof(
            b"0123456789abcdef0123456789abcdeX",
            Prover::Source,
            &v,
            &p
        ));
        assert!(
            !verify_key_proof(k, Prover::Destination, &v, &p),
            "reflected"
        );
        assert!(
            !verify_key_proof(k, Prover::Source, &view(b"tls session B"), &p),
            "relayed into another TLS session"
        );
        let mut other = v;
        other.s2d[0] ^= 1;
        assert!(!verify_key_proof(k, Prover::Source, &other, &p));
        let mut other = v;
        other.d2s[31] ^= 1;
        assert!(!verify_key_proof(k, Prover::Source, &other, &p));
        // A data-channel proof is not a control proof, even with the same key bytes.
        let dk = MacKey::from_bytes(*k);
        let d = data_proof(&dk, Prover::Source, &v);
        assert_ne!(d, p);
        assert!(verify_data_proof(&dk, Prover::Source, &v, &d));
        assert!(!verify_data_proof(&dk, Prover::Destination, &v, &d));
        assert!(!verify_data_proof(
            &MacKey::from_bytes([3; 32]),
            Prover::Source,
            &v,
            &d
        ));
    }

    #[test]
    fn control_tags_refuse_changed_dropped_replayed_and_reordered_frames() {
        let key = MacKey::from_bytes([5; 32]);
        let mut tx = ControlTags::new(key.clone());
        let frames: Vec<(Vec<u8>, Vec<u8>, [u8; 16])> = (0..3u8)
            .map(|i| {
                let (h, b) = (vec![i; 16], vec![i + 10; 5]);
                let t = tx.seal(&h, &b);
                (h, b, t)
            })
            .collect();
        // In order: all open.
        let mut rx = ControlTags::new(key.clone());
        for (h, b, t) in &frames {
            rx.open(h, b, t).unwrap();
        }
        assert_eq!(rx.seq(), 3);
        // Changed body.
        let mut rx = ControlTags::new(key.clone());
        let (h, b, t) = &frames[0];
        let mut b2 = b.clone();
        b2[0] ^= 1;
        assert_eq!(rx.open(h, &b2, t), Err(BadTag { seq: 0 }));
        // Changed header.
        let mut h2 = h.clone();
        h2[15] ^= 1;
        assert!(rx.open(&h2, b, t).is_err());
        // Dropped (frame 1 arrives first), replayed (frame 0 twice), reordered.
        let mut rx = ControlTags::new(key.clone());
        assert!(rx.open(&frames[1].0, &frames[1].1, &frames[1].2).is_err());
        rx.open(&frames[0].0, &frames[0].1, &frames[0].2).unwrap();
        assert!(rx.open(&frames[0].0, &frames[0].1, &frames[0].2).is_err());
        assert!(rx.open(&frames[2].0, &frames[2].1, &frames[2].2).is_err());
        // Another key.
        let mut rx = ControlTags::new(MacKey::from_bytes([6; 32]));
        assert!(rx.open(&frames[0].0, &frames[0].1, &frames[0].2).is_err());
    }
}
