//! The keyed parts of data-channel frames (format v2) and the round gate.
//!
//! Every data frame carries two 16-byte tags under the session's frame key
//! ([`crate::keys::SessionKeys::frame`]), HMAC-SHA256 truncated to 128 bits:
//!
//! ```text
//! header tag  = HMAC(frame, "ferry frame header v2" | header bytes 0..48 | run table)
//! payload tag = HMAC(frame, "ferry frame payload v2" | seq | round | sum)
//!               sum = Σ contribution(gpa, hash(page)) over the chunk's pages, mod 2^128
//! ack tag     = HMAC(frame, "ferry frame ack v2" | seq | status)
//! ```
//!
//! The header tag covers every byte in front of the payload, so a
//! destination checks it before a single byte lands: a rewritten address,
//! round or length is refused with nothing written. The payload tag is
//! computed by the source from its hashes of the pages it read (the same
//! hashes its evidence records) and by the destination from its hashes of
//! the pages that landed, so equal tags mean the chunk's pages landed as the
//! source read them, at the addresses it read them from. Neither side ever
//! sends a page hash or a contribution, only these tags. The ack tag stops
//! anyone without the key from turning a refused chunk into an accepted one
//! (or the reverse).
//!
//! [`RoundGate`] is the stale-copy rule across every channel of a
//! migration: a frame from an earlier round than any channel has seen is
//! refused.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::keys::MacKey;

/// Bytes of a tag.
pub const TAG_LEN: usize = 16;

/// A 16-byte frame tag.
pub type Tag = [u8; TAG_LEN];

const HEADER_LABEL: &[u8] = b"ferry frame header v2";
const PAYLOAD_LABEL: &[u8] = b"ferry frame payload v2";
const ACK_LABEL: &[u8] = b"ferry frame ack v2";

/// The tag over a frame's fixed header fields (everything before the
/// header tag itself) and its run table.
pub fn header_tag(key: &MacKey, fields: &[u8], table: &[u8]) -> Tag {
    key.tag(&[HEADER_LABEL, fields, table])
}

/// Checks a header tag in constant time.
pub fn header_tag_ok(key: &MacKey, fields: &[u8], table: &[u8], tag: &Tag) -> bool {
    key.verify_tag(&[HEADER_LABEL, fields, table], tag)
}

fn payload_parts(seq: u64, round: u32, sum: u128) -> ([u8; 8], [u8; 4], [u8; 16]) {
    (seq.to_le_bytes(), round.to_le_bytes(), sum.to_le_bytes())
}

/// The tag over a chunk's pages: `sum` is the wrapping sum of
/// [`crate::PageKey::contribution`] over its pages (zero pages add 0).
pub fn payload_tag(key: &MacKey, seq: u64, round: u32, sum: u128) -> Tag {
    let (s, r, m) = payload_parts(seq, round, sum);
    key.tag(&[PAYLOAD_LABEL, &s, &r, &m])
}

/// Checks a payload tag in constant time.
pub fn payload_tag_ok(key: &MacKey, seq: u64, round: u32, sum: u128, tag: &Tag) -> bool {
    let (s, r, m) = payload_parts(seq, round, sum);
    key.verify_tag(&[PAYLOAD_LABEL, &s, &r, &m], tag)
}

/// The tag of an acknowledgement.
pub fn ack_tag(key: &MacKey, seq: u64, status: u8) -> Tag {
    key.tag(&[ACK_LABEL, &seq.to_le_bytes(), &[status]])
}

/// Checks an ack tag in constant time.
pub fn ack_tag_ok(key: &MacKey, seq: u64, status: u8, tag: &Tag) -> bool {
    key.verify_tag(&[ACK_LABEL, &seq.to_le_bytes(), &[status]], tag)
}

/// The newest round any data channel of one migration has seen; shared by
/// all of them (TCP and RDMA alike).
///
/// The source starts round k+1 only after every chunk of round k was
/// acknowledged, and fences channels it lost before that; so once a frame
/// of round k+1 has arrived on any channel, a frame of round k can only be
/// a stale copy (a replay, or bytes of a lost channel) and is refused.
#[derive(Debug, Default)]
pub struct RoundGate {
    newest: AtomicU32,
}

impl RoundGate {
    /// A gate that has seen no frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Admits a frame of `round` (raising the newest round seen), or
    /// returns the newer round that makes it stale.
    pub fn admit(&self, round: u32) -> Result<(), u32> {
        let newest = self.newest.fetch_max(round, Ordering::AcqRel);
        if round < newest {
            Err(newest)
        } else {
            Ok(())
        }
    }

    /// The newest round admitted so far.
    pub fn newest(&self) -> u32 {
        self.newest.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_bind_every_field_and_their_purpose() {
        let k = MacKey::from_bytes([7; 32]);
        let other = MacKey::from_bytes([8; 32]);
        let h = header_tag(&k, b"fields", b"table");
        assert!(header_tag_ok(&k, b"fields", b"table", &h));
        assert!(!header_tag_ok(&k, b"fieldz", b"table", &h));
        assert!(!header_tag_ok(&k, b"fields", b"tablf", &h));
        assert!(!header_tag_ok(&k, b"fieldst", b"able", &h), "boundaries");
        assert!(!header_tag_ok(&other, b"fields", b"table", &h));
        let p = payload_tag(&k, 5, 2, 0x1234);
        assert!(payload_tag_ok(&k, 5, 2, 0x1234, &p));
        assert!(!payload_tag_ok(&k, 6, 2, 0x1234, &p), "seq");
        assert!(!payload_tag_ok(&k, 5, 3, 0x1234, &p), "round");
        assert!(!payload_tag_ok(&k, 5, 2, 0x1235, &p), "sum");
        assert!(!payload_tag_ok(&other, 5, 2, 0x1234, &p), "key");
        let a = ack_tag(&k, 5, 0);
        assert!(ack_tag_ok(&k, 5, 0, &a));
        assert!(!ack_tag_ok(&k, 5, 1, &a), "status");
        assert!(!ack_tag_ok(&k, 4, 0, &a), "seq");
        // The same bytes under another purpose give another tag.
        assert_ne!(payload_tag(&k, 0, 0, 0), ack_tag(&k, 0, 0));
    }

    #[test]
    fn the_round_gate_refuses_rounds_older_than_the_newest_seen() {
        let g = RoundGate::new();
        assert_eq!(g.admit(0), Ok(()));
        assert_eq!(g.admit(2), Ok(()));
        assert_eq!(g.admit(2), Ok(()), "same round again is fine");
        assert_eq!(g.admit(1), Err(2), "stale");
        assert_eq!(g.newest(), 2, "a refused frame changes nothing");
        assert_eq!(g.admit(3), Ok(()));
    }
}
