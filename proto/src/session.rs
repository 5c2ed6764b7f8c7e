//! Both sides of the handshake as state machines without IO: each takes
//! the peer's messages (and the transcript hashes the driver keeps over the
//! frames as they crossed the wire) and returns the next message to send,
//! or the session keys once the peer has proven itself. The driver
//! (`ferry_transport::conn`) only moves frames; every decision of the
//! exchange is made here, for control connections and data channels
//! alike. See [`crate::handshake`] for the exchange and its proofs.
//!
//! The source ([`SourceHandshake`]):
//!
//! ```text
//!  new() --Hello--> AwaitReply --HelloReply / Auth--> AwaitWelcome --Welcome--> Done
//!                        |                                 |
//!                        +-- Reject, other, bad version ---+-- Reject, other, bad proof --> error
//! ```
//!
//! The destination ([`DestHandshake`]), once the daemon has read the
//! `Hello` and chosen the version ([`negotiate`]); the source proves first,
//! and nothing derived from a key is sent before its proof verified:
//!
//! ```text
//!  new() --HelloReply--> AwaitAuth --Auth--> Claimed --welcome(credential)--> Done (Welcome sent)
//!                            |                   |
//!                            +-- other --> error +-- proof fails --> Reject(Auth) sent, error
//! ```
//!
//! A control connection welcomes with the pre-shared key; a data channel's
//! claim is first matched against the `data_channel` keys of the sessions
//! that take channels ([`DestHandshake::proves`]).

use crate::control::{Msg, RejectReason, Role, PROTOCOL_MAX, PROTOCOL_MIN};
use crate::handshake::{self, HandshakeView, Prover};
use crate::keys::{MacKey, SessionKeys};

/// What the source proves with.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A control connection: the pre-shared key's bytes.
    Psk(Vec<u8>),
    /// A data channel: the session's `data_channel` key.
    Session(MacKey),
}

/// Why the source's handshake stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The destination refused.
    #[error("peer refused: {reason}: {message}")]
    Rejected {
        /// Its reason.
        reason: RejectReason,
        /// Its explanation.
        message: String,
    },
    /// A message the exchange does not allow at this point.
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected {
        /// What the state allows.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The destination chose a version this build does not speak.
    #[error("unsupported protocol version {version}")]
    UnsupportedVersion {
        /// The version it chose.
        version: u16,
    },
    /// The destination's proof does not verify: another key, or someone in
    /// between.
    #[error("authentication failed: {0}")]
    AuthFailed(&'static str),
}

/// Why a migration session ([`crate::source`], [`crate::dest`]) ended.
/// Each names what went wrong; the drivers map them to their own errors
/// with the same words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// A message the session does not allow at this point.
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected {
        /// What the state allows.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The awaited answer did not come in time.
    #[error("peer did not respond within {after:?} while waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The timeout that expired.
        after: std::time::Duration,
    },
    /// The peer gave up, with its reason.
    #[error("peer aborted the migration: {0}")]
    PeerAborted(String),
    /// The destination's `Ready` does not prove the source's claims.
    #[error("switchover verification failed: {0}")]
    Verification(crate::switchover::Mismatch),
    /// The source's `Commit` does not prove the destination's claims.
    #[error("switchover verification failed: the source's Commit does not prove what this destination holds (evidence, device state or transcript differ, or it is not from this session)")]
    CommitProof,
    /// The device state does not hash to what `Switchover` carries.
    #[error("device state corrupt: its SHA-256 is not the one Switchover carries")]
    DeviceStateCorrupt,
    /// The destination proved it refused the commit (the source may resume).
    #[error("the destination refused the commit: {0}")]
    CommitRefused(String),
    /// `Commit` was sent and nothing proves what the destination did.
    #[error("commit was sent but the destination did not confirm it ({0})")]
    CommitUnconfirmed(String),
    /// The driver reported an event the session's state does not allow (a
    /// bug in the driver, never the peer's doing).
    #[error("session driven out of order: {event} while {state}")]
    OutOfOrder {
        /// The event.
        event: &'static str,
        /// The state it came in.
        state: &'static str,
    },
}

/// The transcript hashes as the source holds them: every frame it sent
/// (`s2d`) and every frame it received (`d2s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcripts {
    /// Source to destination.
    pub s2d: [u8; 32],
    /// Destination to source.
    pub d2s: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitReply,
    AwaitWelcome { version: u16, nonce_d: [u8; 32] },
    Done,
}

/// The source's handshake on one connection.
#[derive(Debug, Clone)]
pub struct SourceHandshake {
    credential: Credential,
    binding: Vec<u8>,
    nonce_s: [u8; 32],
    state: State,
}

/// A finished handshake.
#[derive(Debug, Clone)]
pub struct Established {
    /// The protocol version the destination chose.
    pub version: u16,
    /// The session keys (a control connection's; `None` on a data channel,
    /// which uses the keys of the session it joined).
    pub keys: Option<SessionKeys>,
}

impl SourceHandshake {
    /// Starts a handshake for a connection of `role` whose channel binding
    /// is `binding` (empty on plaintext), with the source's fresh `nonce`.
    /// Returns the machine and the `Hello` to send.
    pub fn new(
        role: Role,
        credential: Credential,
        binding: Vec<u8>,
        nonce: [u8; 32],
    ) -> (Self, Msg) {
        let hello = Msg::Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            role,
            nonce,
        };
        (
            SourceHandshake {
                credential,
                binding,
                nonce_s: nonce,
                state: State::AwaitReply,
            },
            hello,
        )
    }

    fn proof(&self, who: Prover, t: Transcripts) -> [u8; 32] {
        let view = HandshakeView {
            binding: &self.binding,
            s2d: t.s2d,
            d2s: t.d2s,
        };
        match &self.credential {
            Credential::Psk(k) => handshake::key_proof(k, who, &view),
            Credential::Session(k) => handshake::data_proof(k, who, &view),
        }
    }

    fn verify(&self, who: Prover, t: Transcripts, proof: &[u8; 32]) -> bool {
        let view = HandshakeView {
            binding: &self.binding,
            s2d: t.s2d,
            d2s: t.d2s,
        };
        match &self.credential {
            Credential::Psk(k) => handshake::verify_key_proof(k, who, &view, proof),
            Credential::Session(k) => handshake::verify_data_proof(k, who, &view, proof),
        }
    }

    /// The destination's answer to the hello. `heard`: the transcripts
    /// including `msg` (what the source's proof covers). Returns the `Auth`
    /// to send.
    pub fn on_reply(&mut self, msg: Msg, heard: Transcripts) -> Result<Msg, HandshakeError> {
        if self.state != State::AwaitReply {
            return Err(self.unexpected(&msg));
        }
        let (version, nonce_d) = match msg {
            Msg::HelloReply { version, nonce } => (version, nonce),
            Msg::Reject { reason, message } => {
                return Err(HandshakeError::Rejected { reason, message })
            }
            m => {
                return Err(HandshakeError::Unexpected {
                    expected: "HelloReply",
                    got: m.name(),
                })
            }
        };
        if !(PROTOCOL_MIN..=PROTOCOL_MAX).contains(&version) {
            return Err(HandshakeError::UnsupportedVersion { version });
        }
        let proof = self.proof(Prover::Source, heard);
        self.state = State::AwaitWelcome { version, nonce_d };
        Ok(Msg::Auth { proof })
    }

    /// The destination's `Welcome` (or refusal): checks its proof.
    /// `before`: the transcripts before `msg`, including our `Auth` (what
    /// the destination's proof covers). On success the handshake is done.
    pub fn on_welcome(
        &mut self,
        msg: Msg,
        before: Transcripts,
    ) -> Result<Established, HandshakeError> {
        let State::AwaitWelcome { version, nonce_d } = self.state.clone() else {
            return Err(self.unexpected(&msg));
        };
        let proof_d = match msg {
            Msg::Welcome { proof } => proof,
            Msg::Reject { reason, message } => {
                return Err(HandshakeError::Rejected { reason, message })
            }
            m => {
                return Err(HandshakeError::Unexpected {
                    expected: "Welcome",
                    got: m.name(),
                })
            }
        };
        if !self.verify(Prover::Destination, before, &proof_d) {
            return Err(HandshakeError::AuthFailed(match self.credential {
                Credential::Psk(_) => "the destination's proof does not match our key (a different --auth-key-file, or someone in between)",
                Credential::Session(_) => "the destination's data-channel proof is not from our session",
            }));
        }
        self.state = State::Done;
        let keys = match &self.credential {
            Credential::Psk(k) => Some(SessionKeys::derive(k, &self.nonce_s, &nonce_d)),
            Credential::Session(_) => None,
        };
        Ok(Established { version, keys })
    }

    /// True once the destination has proven itself.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn unexpected(&self, msg: &Msg) -> HandshakeError {
        HandshakeError::Unexpected {
            expected: match self.state {
                State::AwaitReply => "HelloReply",
                State::AwaitWelcome { .. } => "Welcome",
                State::Done => "nothing (the handshake is over)",
            },
            got: msg.name(),
        }
    }
}

/// The highest version both sides speak, given the peer's range; `None`
/// when the ranges do not meet.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    let v = peer_max.min(PROTOCOL_MAX);
    (v >= peer_min && v >= PROTOCOL_MIN).then_some(v)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DestState {
    AwaitAuth,
    Claimed {
        proof: [u8; 32],
        before: Transcripts,
    },
    Done,
}

/// The destination's handshake on one connection, after the `Hello`.
#[derive(Debug, Clone)]
pub struct DestHandshake {
    role: Role,
    binding: Vec<u8>,
    nonce_s: [u8; 32],
    nonce_d: [u8; 32],
    version: u16,
    state: DestState,
}

/// The destination refused the source's proof: what to tell it
/// ([`Refusal::reject`]) and the error to report here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The explanation the source gets.
    pub message: &'static str,
    /// Why, for this side.
    pub error: HandshakeError,
}

impl Refusal {
    /// The `Reject` to send.
    pub fn reject(&self) -> Msg {
        Msg::Reject {
            reason: RejectReason::Auth,
            message: self.message.into(),
        }
    }
}

impl DestHandshake {
    /// Starts the destination's side of a connection of `role` whose
    /// `Hello` carried the source's `nonce_s`, at the negotiated `version`,
    /// with the destination's fresh `nonce_d` and the connection's channel
    /// `binding` (empty on plaintext). Returns the machine and the
    /// `HelloReply` to send: a version and a nonce, nothing derived from
    /// any key.
    pub fn new(
        role: Role,
        binding: Vec<u8>,
        nonce_s: [u8; 32],
        version: u16,
        nonce_d: [u8; 32],
    ) -> (Self, Msg) {
        (
            DestHandshake {
                role,
                binding,
                nonce_s,
                nonce_d,
                version,
                state: DestState::AwaitAuth,
            },
            Msg::HelloReply {
                version,
                nonce: nonce_d,
            },
        )
    }

    /// The source's proof. `before`: the transcripts before `msg`, including
    /// our `HelloReply` (what the source's proof covers). Nothing is checked
    /// yet: the credential to check it with may depend on the claim
    /// ([`DestHandshake::proves`]).
    pub fn on_auth(&mut self, msg: Msg, before: Transcripts) -> Result<(), HandshakeError> {
        if self.state != DestState::AwaitAuth {
            return Err(HandshakeError::Unexpected {
                expected: self.expected(),
                got: msg.name(),
            });
        }
        match msg {
            Msg::Auth { proof } => {
                self.state = DestState::Claimed { proof, before };
                Ok(())
            }
            m => Err(HandshakeError::Unexpected {
                expected: "Auth",
                got: m.name(),
            }),
        }
    }

    /// True if the source's proof verifies under `credential` (constant
    /// time); false before the proof came.
    pub fn proves(&self, credential: &Credential) -> bool {
        let DestState::Claimed { proof, before } = &self.state else {
            return false;
        };
        let view = HandshakeView {
            binding: &self.binding,
            s2d: before.s2d,
            d2s: before.d2s,
        };
        match credential {
            Credential::Psk(k) => handshake::verify_key_proof(k, Prover::Source, &view, proof),
            Credential::Session(k) => handshake::verify_data_proof(k, Prover::Source, &view, proof),
        }
    }

    /// Checks the source's proof under `credential` and, if it verifies,
    /// proves the destination: returns the `Welcome` to send and the
    /// session (a control connection's keys derived from the pre-shared
    /// key and both nonces). `now`: the transcripts after the source's
    /// `Auth` (what the destination's proof covers). If it does not
    /// verify: the `Reject` to send and the error.
    pub fn welcome(
        &mut self,
        credential: &Credential,
        now: Transcripts,
    ) -> Result<(Msg, Established), Refusal> {
        if !matches!(self.state, DestState::Claimed { .. }) {
            return Err(Refusal {
                message: "authentication failed: no proof before the welcome",
                error: HandshakeError::Unexpected {
                    expected: self.expected(),
                    got: "nothing",
                },
            });
        }
        if !self.proves(credential) {
            let (message, why) = match credential {
                Credential::Psk(_) => (
                    "authentication failed: the source's proof does not match this destination's key (the two --auth-key-file keys differ, or something in between relays the connection)",
                    "the source's proof does not match our key (the two --auth-key-file keys differ, or something in between relays the connection)",
                ),
                Credential::Session(_) => (
                    "authentication failed: the data channel's proof is not from this session",
                    "the data channel's proof is not from this session",
                ),
            };
            return Err(Refusal {
                message,
                error: HandshakeError::AuthFailed(why),
            });
        }
        let view = HandshakeView {
            binding: &self.binding,
            s2d: now.s2d,
            d2s: now.d2s,
        };
        let (proof, keys) = match credential {
            Credential::Psk(k) => (
                handshake::key_proof(k, Prover::Destination, &view),
                Some(SessionKeys::derive(k, &self.nonce_s, &self.nonce_d)),
            ),
            Credential::Session(k) => (handshake::data_proof(k, Prover::Destination, &view), None),
        };
        self.state = DestState::Done;
        Ok((
            Msg::Welcome { proof },
            Established {
                version: self.version,
                keys,
            },
        ))
    }

    /// The role the source's hello named.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True once the destination has welcomed the source.
    pub fn is_done(&self) -> bool {
        self.state == DestState::Done
    }

    fn expected(&self) -> &'static str {
        match self.state {
            DestState::AwaitAuth => "Auth",
            DestState::Claimed { .. } => "nothing (the proof is being checked)",
            DestState::Done => "nothing (the handshake is over)",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    const PSK: [u8; 32] = [0x11; 32];

    /// Two endpoints' views of one connection: the transcript hashes over
    /// the frames as they crossed (encoded, then decoded by the peer), and
    /// a destination that runs the exchange as the daemon does.
    #[derive(Default)]
    struct Wire {
        s2d: Sha256,
        d2s: Sha256,
        binding: Vec<u8>,
    }

    impl Wire {
        fn t(&self) -> Transcripts {
            Transcripts {
                s2d: self.s2d.clone().finalize().into(),
                d2s: self.d2s.clone().finalize().into(),
            }
        }
        fn view(&self) -> ([u8; 32], [u8; 32]) {
            let t = self.t();
            (t.s2d, t.d2s)
        }
        fn cross(h: &mut Sha256, m: &Msg) -> Msg {
            let b = m.encode();
            h.update(&b);
            let head = Msg::decode_head(b[..16].try_into().unwrap(), u32::MAX).unwrap();
            Msg::decode_body(&b[16..], head.crc).unwrap()
        }
        fn source_sends(&mut self, m: &Msg) -> Msg {
            Self::cross(&mut self.s2d, m)
        }
        fn dest_sends(&mut self, m: &Msg) -> Msg {
            Self::cross(&mut self.d2s, m)
        }
        fn hv(&self) -> HandshakeView<'_> {
            let (s2d, d2s) = self.view();
            HandshakeView {
                binding: &self.binding,
                s2d,
                d2s,
            }
        }
    }

    /// Runs a whole handshake against a destination that proves with
    /// `dest`; returns the source's outcome and whether the destination
    /// accepted the source's proof.
    fn run(
        credential: Credential,
        dest: Credential,
    ) -> (Result<Established, HandshakeError>, bool) {
        let mut w = Wire {
            binding: vec![7; 32],
            ..Default::default()
        };
        let (mut hs, hello) =
            SourceHandshake::new(Role::Control, credential, w.binding.clone(), [1; 32]);
        let _ = w.source_sends(&hello);
        let reply = w.dest_sends(&Msg::HelloReply {
            version: PROTOCOL_MAX,
            nonce: [2; 32],
        });
        let auth = hs.on_reply(reply, w.t()).unwrap();
        let (before_s2d, before_d2s) = w.view();
        let auth = w.source_sends(&auth);
        let Msg::Auth { proof } = auth else {
            panic!("an Auth")
        };
        let view_s = HandshakeView {
            binding: &w.binding,
            s2d: before_s2d,
            d2s: before_d2s,
        };
        let dest_accepts = match &dest {
            Credential::Psk(k) => handshake::verify_key_proof(k, Prover::Source, &view_s, &proof),
            Credential::Session(k) => {
                handshake::verify_data_proof(k, Prover::Source, &view_s, &proof)
            }
        };
        let proof_d = match &dest {
            Credential::Psk(k) => handshake::key_proof(k, Prover::Destination, &w.hv()),
            Credential::Session(k) => handshake::data_proof(k, Prover::Destination, &w.hv()),
        };
        let before = w.t();
        let welcome = w.dest_sends(&Msg::Welcome { proof: proof_d });
        (hs.on_welcome(welcome, before), dest_accepts)
    }

    #[test]
    fn a_control_handshake_ends_with_the_destinations_session_keys() {
        let (r, accepted) = run(Credential::Psk(PSK.to_vec()), Credential::Psk(PSK.to_vec()));
        assert!(accepted, "the destination accepts the source's proof");
        let done = r.unwrap();
        assert_eq!(done.version, PROTOCOL_MAX);
        let ours = done.keys.unwrap();
        let theirs = SessionKeys::derive(&PSK, &[1; 32], &[2; 32]);
        assert_eq!(ours.frame.tag(&[b"x"]), theirs.frame.tag(&[b"x"]));
        assert_eq!(
            ours.data_channel.tag(&[b"y"]),
            theirs.data_channel.tag(&[b"y"])
        );
    }

    #[test]
    fn a_data_channel_proves_its_session_and_derives_nothing() {
        let k = MacKey::from_bytes([5; 32]);
        let (r, accepted) = run(Credential::Session(k.clone()), Credential::Session(k));
        assert!(accepted);
        assert!(r.unwrap().keys.is_none());
    }

    #[test]
    fn a_destination_with_another_key_fails_authentication() {
        let (r, accepted) = run(
            Credential::Psk(PSK.to_vec()),
            Credential::Psk(vec![0x22; 32]),
        );
        assert!(!accepted, "and it refuses the source first");
        assert!(matches!(r, Err(HandshakeError::AuthFailed(_))));
        let (r, _) = run(
            Credential::Session(MacKey::from_bytes([5; 32])),
            Credential::Session(MacKey::from_bytes([6; 32])),
        );
        assert_eq!(
            r.unwrap_err(),
            HandshakeError::AuthFailed(
                "the destination's data-channel proof is not from our session"
            )
        );
    }

    #[test]
    fn a_data_proof_never_passes_for_a_control_proof() {
        let (r, accepted) = run(
            Credential::Psk(PSK.to_vec()),
            Credential::Session(MacKey::from_bytes(PSK)),
        );
        assert!(!accepted);
        assert!(matches!(r, Err(HandshakeError::AuthFailed(_))));
    }

    #[test]
    fn a_hello_changed_on_the_way_fails_both_proofs() {
        let edit = |m: Msg| match m {
            Msg::Hello {
                max_version,
                role,
                nonce,
                ..
            } => Msg::Hello {
                min_version: 1,
                max_version,
                role,
                nonce,
            },
            m => m,
        };
        // A relay changes the hello: the destination's transcript holds a
        // hello the source did not send, so its Welcome does not verify.
        let mut w = Wire::default();
        let (mut hs, hello) = SourceHandshake::new(
            Role::Control,
            Credential::Psk(PSK.to_vec()),
            vec![],
            [1; 32],
        );
        let sent = w.source_sends(&hello);
        let mut dest_view = Wire::default();
        let _ = dest_view.source_sends(&edit(sent));
        let reply = Msg::HelloReply {
            version: 2,
            nonce: [2; 32],
        };
        let reply_s = w.dest_sends(&reply);
        let _ = dest_view.dest_sends(&reply);
        let auth = w.source_sends(&hs.on_reply(reply_s, w.t()).unwrap());
        let _ = dest_view.source_sends(&auth);
        let proof = handshake::key_proof(&PSK, Prover::Destination, &dest_view.hv());
        let before = w.t();
        let welcome = w.dest_sends(&Msg::Welcome { proof });
        assert!(matches!(
            hs.on_welcome(welcome, before),
            Err(HandshakeError::AuthFailed(_))
        ));
    }

    fn started() -> SourceHandshake {
        SourceHandshake::new(Role::Data, Credential::Psk(PSK.to_vec()), vec![], [0; 32]).0
    }

    fn zero() -> Transcripts {
        Transcripts {
            s2d: [0; 32],
            d2s: [0; 32],
        }
    }

    #[test]
    fn refusals_and_strays_end_the_handshake_with_their_names() {
        let refusal = || Msg::Reject {
            reason: RejectReason::Busy,
            message: "full".into(),
        };
        assert_eq!(
            started().on_reply(refusal(), zero()),
            Err(HandshakeError::Rejected {
                reason: RejectReason::Busy,
                message: "full".into()
            })
        );
        assert_eq!(
            started().on_reply(Msg::Welcome { proof: [0; 32] }, zero()),
            Err(HandshakeError::Unexpected {
                expected: "HelloReply",
                got: "Welcome"
            })
        );
        let mut hs = started();
        hs.on_reply(
            Msg::HelloReply {
                version: 2,
                nonce: [0; 32],
            },
            zero(),
        )
        .unwrap();
        assert!(matches!(
            hs.clone().on_welcome(refusal(), zero()),
            Err(HandshakeError::Rejected { .. })
        ));
        assert_eq!(
            hs.clone()
                .on_welcome(Msg::Ping { seq: 0 }, zero())
                .unwrap_err(),
            HandshakeError::Unexpected {
                expected: "Welcome",
                got: "Ping"
            }
        );
        assert_eq!(
            hs.on_reply(
                Msg::HelloReply {
                    version: 2,
                    nonce: [0; 32]
                },
                zero()
            )
            .unwrap_err(),
            HandshakeError::Unexpected {
                expected: "Welcome",
                got: "HelloReply"
            },
            "a second reply"
        );
        assert!(!started().is_done());
    }

    #[test]
    fn a_version_this_build_does_not_speak_is_refused() {
        for version in [0, PROTOCOL_MIN - 1, PROTOCOL_MAX + 1, u16::MAX] {
            assert_eq!(
                started().on_reply(
                    Msg::HelloReply {
                        version,
                        nonce: [0; 32]
                    },
                    zero()
                ),
                Err(HandshakeError::UnsupportedVersion { version })
            );
        }
    }

    #[test]
    fn the_hello_carries_our_versions_role_and_nonce() {
        let (_, hello) = SourceHandshake::new(Role::Data, Credential::Psk(vec![]), vec![], [9; 32]);
        assert_eq!(
            hello,
            Msg::Hello {
                min_version: PROTOCOL_MIN,
                max_version: PROTOCOL_MAX,
                role: Role::Data,
                nonce: [9; 32]
            }
        );
    }

    /// Both machines against each other through [`Wire`]: the source with
    /// `src`, the destination welcoming with `dst` (a hello edited on the
    /// way by `edit`, as the destination hears it). Returns the source's
    /// outcome and the destination's.
    fn both(
        role: Role,
        src: Credential,
        dst: Credential,
        edit: fn(Msg) -> Msg,
    ) -> (
        Result<Established, HandshakeError>,
        Result<Established, Refusal>,
    ) {
        let mut w = Wire {
            binding: vec![3; 32],
            ..Default::default()
        };
        let mut heard = Wire {
            binding: vec![3; 32],
            ..Default::default()
        };
        let (mut hs, hello) = SourceHandshake::new(role, src, w.binding.clone(), [1; 32]);
        let hello = edit(w.source_sends(&hello));
        let _ = heard.source_sends(&hello);
        let Msg::Hello {
            min_version,
            max_version,
            nonce,
            ..
        } = hello
        else {
            panic!("a Hello")
        };
        let version = negotiate(min_version, max_version).unwrap();
        let (mut d, reply) =
            DestHandshake::new(role, heard.binding.clone(), nonce, version, [2; 32]);
        let _ = heard.dest_sends(&reply);
        let reply = w.dest_sends(&reply);
        let auth = hs.on_reply(reply, w.t()).unwrap();
        let _ = w.source_sends(&auth);
        let before = heard.t();
        let auth = heard.source_sends(&auth);
        d.on_auth(auth, before).unwrap();
        let welcomed = d.welcome(&dst, heard.t());
        let answer = match &welcomed {
            Ok((m, _)) => m.clone(),
            Err(r) => r.reject(),
        };
        let _ = heard.dest_sends(&answer);
        let before = w.t();
        let answer = w.dest_sends(&answer);
        (hs.on_welcome(answer, before), welcomed.map(|(_, e)| e))
    }

    #[test]
    fn source_and_destination_machines_agree_on_the_session_keys() {
        let psk = Credential::Psk(PSK.to_vec());
        let (s, d) = both(Role::Control, psk.clone(), psk, |m| m);
        let (s, d) = (s.unwrap(), d.unwrap());
        assert_eq!(s.version, d.version);
        let (ks, kd) = (s.keys.unwrap(), d.keys.unwrap());
        assert!(kd.commit.verify(&[b"c"], &ks.commit.mac(&[b"c"])));
        assert_eq!(ks.frame.tag(&[b"f"]), kd.frame.tag(&[b"f"]));
    }

    #[test]
    fn the_destination_refuses_another_key_before_proving_anything() {
        let (s, d) = both(
            Role::Control,
            Credential::Psk(PSK.to_vec()),
            Credential::Psk(vec![0x22; 32]),
            |m| m,
        );
        let r = d.unwrap_err();
        assert!(matches!(
            r.reject(),
            Msg::Reject {
                reason: RejectReason::Auth,
                ..
            }
        ));
        assert!(matches!(r.error, HandshakeError::AuthFailed(_)));
        // The source hears the refusal, not a welcome.
        assert!(matches!(s, Err(HandshakeError::Rejected { .. })), "{s:?}");
    }

    #[test]
    fn the_destination_refuses_a_hello_changed_on_the_way() {
        let (s, d) = both(
            Role::Control,
            Credential::Psk(PSK.to_vec()),
            Credential::Psk(PSK.to_vec()),
            |m| match m {
                Msg::Hello {
                    min_version,
                    max_version,
                    role,
                    mut nonce,
                } => {
                    nonce[5] ^= 1;
                    Msg::Hello {
                        min_version,
                        max_version,
                        role,
                        nonce,
                    }
                }
                m => m,
            },
        );
        assert!(d.is_err());
        assert!(s.is_err());
    }

    #[test]
    fn a_data_channel_is_matched_to_its_session_and_only_to_it() {
        let ours = MacKey::from_bytes([5; 32]);
        let other = MacKey::from_bytes([6; 32]);
        let (s, d) = both(
            Role::Data,
            Credential::Session(ours.clone()),
            Credential::Session(ours.clone()),
            |m| m,
        );
        assert!(s.unwrap().keys.is_none() && d.unwrap().keys.is_none());
        // The claim, checked against several sessions' keys.
        let (mut d, _) = DestHandshake::new(Role::Data, vec![], [0; 32], 2, [2; 32]);
        assert!(
            !d.proves(&Credential::Session(ours.clone())),
            "no proof yet"
        );
        let view = HandshakeView {
            binding: &[],
            s2d: [7; 32],
            d2s: [8; 32],
        };
        let proof = handshake::data_proof(&ours, Prover::Source, &view);
        let before = Transcripts {
            s2d: [7; 32],
            d2s: [8; 32],
        };
        d.on_auth(Msg::Auth { proof }, before).unwrap();
        assert!(d.proves(&Credential::Session(ours.clone())));
        assert!(!d.proves(&Credential::Session(other.clone())));
        assert!(
            !d.proves(&Credential::Psk(vec![5; 32])),
            "not a control proof"
        );
        let r = d
            .clone()
            .welcome(&Credential::Session(other), before)
            .unwrap_err();
        assert!(matches!(r.error, HandshakeError::AuthFailed(_)));
        assert!(!d.is_done());
        d.welcome(&Credential::Session(ours), before).unwrap();
        assert!(d.is_done());
        assert_eq!(d.role(), Role::Data);
    }

    #[test]
    fn the_destination_takes_one_auth_and_nothing_else() {
        let fresh = || DestHandshake::new(Role::Control, vec![], [0; 32], 2, [2; 32]);
        let (d, reply) = fresh();
        assert_eq!(
            reply,
            Msg::HelloReply {
                version: 2,
                nonce: [2; 32]
            }
        );
        assert_eq!(
            d.clone().on_auth(Msg::Ping { seq: 1 }, zero()),
            Err(HandshakeError::Unexpected {
                expected: "Auth",
                got: "Ping"
            })
        );
        let mut d2 = d.clone();
        d2.on_auth(Msg::Auth { proof: [0; 32] }, zero()).unwrap();
        assert!(matches!(
            d2.on_auth(Msg::Auth { proof: [0; 32] }, zero()),
            Err(HandshakeError::Unexpected { .. })
        ));
        // A welcome before any proof is refused.
        let r = fresh()
            .0
            .welcome(&Credential::Psk(PSK.to_vec()), zero())
            .unwrap_err();
        assert!(matches!(r.error, HandshakeError::Unexpected { .. }));
        assert!(matches!(r.reject(), Msg::Reject { .. }));
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(PROTOCOL_MIN, PROTOCOL_MAX), Some(PROTOCOL_MAX));
        assert_eq!(negotiate(0, u16::MAX), Some(PROTOCOL_MAX));
        assert_eq!(negotiate(PROTOCOL_MAX + 1, u16::MAX), None);
        assert_eq!(negotiate(0, PROTOCOL_MIN - 1), None);
        assert_eq!(negotiate(5, 3), None, "an empty range");
    }
}
