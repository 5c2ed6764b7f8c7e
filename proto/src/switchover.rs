//! The switchover's proofs.
//!
//! With the guest paused and the final copy acknowledged, the two sides
//! prove to each other, under the session's commit key
//! ([`crate::keys::SessionKeys::commit`]), that they agree on everything the
//! destination is about to run:
//!
//! ```text
//! S -> D  Switchover { device_state, device_state_hash = SHA-256(device_state), verify_full }
//! D       stops every data channel; checks the hash
//! D -> S  Ready { transcript  = MAC("ferry ready transcript",   s2d, d2s),
//!                 evidence    = MAC("ferry ready evidence",     s2d, d2s, E_d),
//!                 device_state= MAC("ferry ready device state", s2d, d2s, H),
//!                 memory      = MAC("ferry ready memory",       s2d, d2s, M_d) (verify_full only) }
//! S       recomputes each with its own values: the first that differs names the
//!         reason of the abort (guest resumed here)
//! S -> D  Commit    { MAC("ferry commit", s2d, d2s, E, H, M, Ready) }
//! D       checks it, restores the device state (everything that can fail), then
//! D -> S  Committed { MAC("ferry committed", Commit) }   and only then resumes
//!    or   CommitRefused { reason, MAC("ferry commit refused", Commit, reason) }
//! S -> D  Audit     { report, MAC("ferry audit", Committed, report) }   after the pause
//! ```
//!
//! `s2d` and `d2s` are the SHA-256 transcripts of every control frame each
//! way up to and including `Switchover` (both sides take them at that
//! point), `E` the page evidence ([`crate::evidence`]), `H` the device-state
//! hash, `M` the whole-memory evidence of `--verify full`. Every part of
//! `Ready` binds the transcripts, so a `Ready` from another session, or from
//! this one with any control message changed on the way, fails as a whole;
//! the parts are separate MACs so that the source can say which claim
//! differs. `Commit` binds `Ready`, `Committed` and a refusal bind `Commit`:
//! none can be replayed or forged without the session's keys, so a source
//! that sees a valid refusal may resume its guest (the destination will
//! never run it), and one that sees a valid `Committed` may let it go.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::evidence::Evidence;
use crate::keys::MacKey;

/// The SHA-256 transcripts of the control connection, by direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Transcripts {
    /// Every frame the source sent (the destination received).
    pub s2d: [u8; 32],
    /// Every frame the destination sent (the source received).
    pub d2s: [u8; 32],
}

/// What one side claims at switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// Transcripts up to and including `Switchover`.
    pub transcripts: Transcripts,
    /// Page evidence: what was sent (source) or what landed (destination).
    pub evidence: Evidence,
    /// SHA-256 of the device state.
    pub device_state: [u8; 32],
    /// Whole-memory evidence (`--verify full` only).
    pub memory: Option<Evidence>,
}

/// SHA-256 of a device-state blob.
pub fn device_state_hash(state: &[u8]) -> [u8; 32] {
    Sha256::digest(state).into()
}

/// The destination's `Ready`: one MAC per claim, each binding the
/// transcripts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyProof {
    /// Over the transcripts alone.
    pub transcript: [u8; 32],
    /// Over the transcripts and the page evidence.
    pub evidence: [u8; 32],
    /// Over the transcripts and the device-state hash.
    pub device_state: [u8; 32],
    /// Over the transcripts and the whole-memory evidence (`--verify full`).
    pub memory: Option<[u8; 32]>,
}

/// The claim a [`ReadyProof`] does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// The control messages differ: one was changed, dropped or added on
    /// the way (or the proof comes from another session).
    Transcript,
    /// The page evidence differs: a page at the destination does not hold
    /// what the source last sent for it at its address.
    Evidence,
    /// The device state differs.
    DeviceState,
    /// The whole-memory check of `--verify full` differs (or one side did
    /// not make it).
    Memory,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mismatch::Transcript => "the control transcripts differ (a control message was changed, dropped or added on the way, or the proof is from another session)",
            Mismatch::Evidence => "the page evidence differs (a page at the destination does not hold what the source last sent for it, at its address: corrupted, missing, misplaced or stale)",
            Mismatch::DeviceState => "the device state differs",
            Mismatch::Memory => "the whole-memory check (--verify full) differs: source and destination memory are not equal",
        })
    }
}

fn part(key: &MacKey, label: &[u8], t: &Transcripts, value: &[u8]) -> [u8; 32] {
    key.mac(&[label, &t.s2d, &t.d2s, value])
}

const READY_TRANSCRIPT: &[u8] = b"ferry ready transcript";
const READY_EVIDENCE: &[u8] = b"ferry ready evidence";
const READY_DEVICE: &[u8] = b"ferry ready device state";
const READY_MEMORY: &[u8] = b"ferry ready memory";

impl ReadyProof {
    /// The proof of `claims`.
    pub fn new(key: &MacKey, claims: &Claims) -> Self {
        let t = &claims.transcripts;
        ReadyProof {
            transcript: part(key, READY_TRANSCRIPT, t, &[]),
            evidence: part(key, READY_EVIDENCE, t, &claims.evidence.to_bytes()),
            device_state: part(key, READY_DEVICE, t, &claims.device_state),
            memory: claims
                .memory
                .map(|m| part(key, READY_MEMORY, t, &m.to_bytes())),
        }
    }

    /// Checks the proof against our own claims (in constant time per MAC);
    /// the first claim that differs, transcripts first (when they differ,
    /// every part does).
    pub fn check(&self, key: &MacKey, ours: &Claims) -> Result<(), Mismatch> {
        let t = &ours.transcripts;
        if !key.verify(&[READY_TRANSCRIPT, &t.s2d, &t.d2s, &[]], &self.transcript) {
            return Err(Mismatch::Transcript);
        }
        let dev = &ours.device_state;
        if !key.verify(&[READY_DEVICE, &t.s2d, &t.d2s, dev], &self.device_state) {
            return Err(Mismatch::DeviceState);
        }
        let ev = ours.evidence.to_bytes();
        if !key.verify(&[READY_EVIDENCE, &t.s2d, &t.d2s, &ev], &self.evidence) {
            return Err(Mismatch::Evidence);
        }
        match (ours.memory, self.memory) {
            (None, None) => Ok(()),
            (Some(m), Some(mac))
                if key.verify(&[READY_MEMORY, &t.s2d, &t.d2s, &m.to_bytes()], &mac) =>
            {
                Ok(())
            }
            _ => Err(Mismatch::Memory),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 * 32);
        b.extend_from_slice(&self.transcript);
        b.extend_from_slice(&self.evidence);
        b.extend_from_slice(&self.device_state);
        if let Some(m) = &self.memory {
            b.extend_from_slice(m);
        }
        b
    }
}

/// The source's `Commit`: binds every claim and the `Ready` it answers.
pub fn commit_mac(key: &MacKey, claims: &Claims, ready: &ReadyProof) -> [u8; 32] {
    let t = &claims.transcripts;
    let memory = claims.memory.map(Evidence::to_bytes);
    key.mac(&[
        b"ferry commit",
        &t.s2d,
        &t.d2s,
        &claims.evidence.to_bytes(),
        &claims.device_state,
        memory.as_ref().map_or(&[][..], |m| &m[..]),
        &ready.bytes(),
    ])
}

/// Checks a `Commit` against our claims and the `Ready` we sent.
pub fn check_commit(key: &MacKey, claims: &Claims, ready: &ReadyProof, mac: &[u8; 32]) -> bool {
    let expected = commit_mac(key, claims, ready);
    // Constant time: compare MACs of the two values under the same key.
    key.verify(
        &[b"ferry compare", &expected],
        &key.mac(&[b"ferry compare", mac]),
    )
}

/// The destination's `Committed`: binds the `Commit` it confirms.
pub fn committed_mac(key: &MacKey, commit: &[u8; 32]) -> [u8; 32] {
    key.mac(&[b"ferry committed", commit])
}

/// Checks a `Committed` against the `Commit` we sent.
pub fn check_committed(key: &MacKey, commit: &[u8; 32], mac: &[u8; 32]) -> bool {
    key.verify(&[b"ferry committed", commit], mac)
}

/// The destination's refusal of a `Commit` it checked (a failed restore):
/// binds the `Commit` and the reason.
pub fn refusal_mac(key: &MacKey, commit: &[u8; 32], reason: &str) -> [u8; 32] {
    key.mac(&[b"ferry commit refused", commit, reason.as_bytes()])
}

/// Checks a refusal against the `Commit` we sent.
pub fn check_refusal(key: &MacKey, commit: &[u8; 32], reason: &str, mac: &[u8; 32]) -> bool {
    key.verify(&[b"ferry commit refused", commit, reason.as_bytes()], mac)
}

/// The source's audit report after the pause: binds the `Committed` it
/// follows and the report's bytes.
pub fn audit_mac(key: &MacKey, committed: &[u8; 32], report: &[u8]) -> [u8; 32] {
    key.mac(&[b"ferry audit", committed, report])
}

/// A short value both sides print after a commit to show they verified the
/// same switchover (the first 16 bytes of the SHA-256 of `Committed`'s
/// MAC; it reveals nothing of the keys or the evidence).
pub fn fingerprint(committed: &[u8; 32]) -> [u8; 16] {
    let h: [u8; 32] = Sha256::digest(committed).into();
    let mut f = [0u8; 16];
    f.copy_from_slice(&h[..16]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MacKey {
        MacKey::from_bytes([7; 32])
    }

    fn claims() -> Claims {
        Claims {
            transcripts: Transcripts {
                s2d: [1; 32],
                d2s: [2; 32],
            },
            evidence: Evidence(0x1234),
            device_state: device_state_hash(b"vcpu registers"),
            memory: None,
        }
    }

    #[test]
    fn equal_claims_verify() {
        let c = claims();
        let r = ReadyProof::new(&key(), &c);
        assert_eq!(r.check(&key(), &c), Ok(()));
        let full = Claims {
            memory: Some(Evidence(99)),
            ..c
        };
        let r = ReadyProof::new(&key(), &full);
        assert_eq!(r.check(&key(), &full), Ok(()));
        let m = commit_mac(&key(), &full, &r);
        assert!(check_commit(&key(), &full, &r, &m));
    }

    #[test]
    fn any_one_claim_changed_is_refused_and_named() {
        let ours = claims();
        let cases: Vec<(Claims, Mismatch)> = vec![
            (
                Claims {
                    transcripts: Transcripts {
                        s2d: [9; 32],
                        ..ours.transcripts
                    },
                    ..ours
                },
                Mismatch::Transcript,
            ),
            (
                Claims {
                    transcripts: Transcripts {
                        d2s: [9; 32],
                        ..ours.transcripts
                    },
                    ..ours
                },
                Mismatch::Transcript,
            ),
            (
                Claims {
                    evidence: Evidence(0x1235),
                    ..ours
                },
                Mismatch::Evidence,
            ),
            (
                Claims {
                    device_state: device_state_hash(b"vcpu registers!"),
                    ..ours
                },
                Mismatch::DeviceState,
            ),
            (
                Claims {
                    memory: Some(Evidence(1)),
                    ..ours
                },
                Mismatch::Memory,
            ),
        ];
        for (theirs, why) in cases {
            let r = ReadyProof::new(&key(), &theirs);
            assert_eq!(r.check(&key(), &ours), Err(why), "{theirs:?}");
            // The commit MAC binds the same claims: a destination holding
            // other claims refuses the source's Commit.
            let good = ReadyProof::new(&key(), &ours);
            let m = commit_mac(&key(), &ours, &good);
            assert!(!check_commit(&key(), &theirs, &good, &m), "{theirs:?}");
        }
        // Full verification on one side only.
        let full = Claims {
            memory: Some(Evidence(5)),
            ..ours
        };
        let r = ReadyProof::new(&key(), &ours);
        assert_eq!(r.check(&key(), &full), Err(Mismatch::Memory));
        let r = ReadyProof::new(&key(), &full);
        assert_eq!(r.check(&key(), &ours), Err(Mismatch::Memory));
        let wrong_mem = Claims {
            memory: Some(Evidence(6)),
            ..ours
        };
        assert_eq!(r.check(&key(), &wrong_mem), Err(Mismatch::Memory));
    }

    #[test]
    fn proofs_do_not_verify_under_another_key_or_for_another_message() {
        let c = claims();
        let other = MacKey::from_bytes([8; 32]);
        let r = ReadyProof::new(&other, &c);
        assert_eq!(r.check(&key(), &c), Err(Mismatch::Transcript));
        let r = ReadyProof::new(&key(), &c);
        let commit = commit_mac(&key(), &c, &r);
        assert!(!check_commit(&other, &c, &r, &commit));
        // A Commit for another Ready (a replayed one) is refused.
        let r2 = ReadyProof {
            evidence: [0; 32],
            ..r
        };
        assert!(!check_commit(&key(), &c, &r2, &commit));
        // Committed, refusal and audit MACs are bound to the commit and
        // their content, and differ from each other.
        let done = committed_mac(&key(), &commit);
        assert!(check_committed(&key(), &commit, &done));
        assert!(!check_committed(&key(), &[0; 32], &done));
        assert!(!check_committed(&other, &commit, &done));
        let no = refusal_mac(&key(), &commit, "restore failed");
        assert!(check_refusal(&key(), &commit, "restore failed", &no));
        assert!(!check_refusal(&key(), &commit, "restore failed.", &no));
        assert!(!check_refusal(&key(), &[1; 32], "restore failed", &no));
        assert_ne!(done, committed_mac(&key(), &[0; 32]));
        assert_ne!(done, refusal_mac(&key(), &commit, ""));
        assert_ne!(
            refusal_mac(&key(), &commit, "restore failed"),
            refusal_mac(&key(), &commit, "restore failed!")
        );
        assert_ne!(
            audit_mac(&key(), &done, b"a"),
            audit_mac(&key(), &done, b"b")
        );
        assert_eq!(fingerprint(&done), fingerprint(&done));
        assert_ne!(fingerprint(&done), fingerprint(&commit));
    }
}
