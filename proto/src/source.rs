//! The source's migration session as a state machine without IO: the
//! control flow of a migration after the offer was accepted — rounds, the
//! fence of lost channels, the round trip measured between rounds, the
//! switchover's proofs, commit or abort. The driver
//! (`ferry_migration::engine`) sends pages, harvests the dirty log, pauses
//! and resumes the guest and moves control frames; it tells this machine
//! what happened (a round's pages were all acknowledged, a message came, a
//! deadline passed, with the time passed in) and does what it returns.
//! Which pages a round carries and when to stop pre-copy are the driver's
//! ([`crate::budget`]); what may be said when, what an answer must be, and
//! whether the guest is still the source's are decided here.
//!
//! ```text
//!            +-----------------------------------------------+
//!            v                                               |
//!  new --> Sending --round_flushed(lost)--> Fencing --Fenced-+   (lost channels only)
//!            |  \
//!            |   round_done/ping --> AwaitPong --Pong--> Between --next_round--> Sending
//!            |                                            |
//!            |                                  pause --> Sending (paused: the final copy)
//!            |                                                  |
//!            |            switchover(device state) --> AwaitReady --Ready, verify_ready(claims)--> Verified
//!            |                                                                                       |
//!            |                                       commit --> AwaitCommitted --Committed--> Committed --audit-->
//!            |                                                        |
//!            |                                                        +--CommitRefused (proven)--> Refused
//!            +-- any error, a timeout, abort() -------------------------------------------> Aborted
//! ```
//!
//! The guest stays the source's ([`SourceSession::guest_is_ours`]) until
//! `Commit` is sent, and again after a refusal that carries the session's
//! proof; from `Commit` on, any failure leaves it with the destination
//! (which may already run it), so no `Abort` is sent.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::{AuditReport, Msg, Switchover};
use crate::keys::MacKey;
use crate::session::SessionError;
use crate::switchover::{self as proof, Claims, ReadyProof};

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// The driver sends the round's pages (the final copy when `paused`).
    Sending { paused: bool },
    /// `Fence` sent for `channels` at `since`; the round goes on at `Fenced`.
    Fencing {
        paused: bool,
        channels: Vec<SocketAddr>,
        since: Instant,
    },
    /// `RoundDone` sent: the round trip is measured next.
    Announced,
    /// `Ping { seq }` sent at `sent`.
    AwaitPong { seq: u64, sent: Instant },
    /// Between two pre-copy rounds: the driver decides (convergence).
    Between,
    /// `Switchover` sent at `since`.
    AwaitReady {
        device_state: [u8; 32],
        since: Instant,
    },
    /// `Ready` came; it is checked against the source's claims next.
    ReadyReceived { ready: ReadyProof },
    /// `Ready` matched the source's claims: `Commit` may be sent.
    Verified { commit: [u8; 32] },
    /// `Commit` sent at `since`.
    AwaitCommitted { commit: [u8; 32], since: Instant },
    /// The destination proved it committed: the guest is its.
    Committed { mac: [u8; 32] },
    /// The destination proved it refused the commit: the guest is ours.
    Refused,
    /// Over, on an error or an abort.
    Aborted,
}

/// What a message (or a step of the driver) brought about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The destination confirmed the fence: nothing of the lost channels
    /// can land any more; the round may go on.
    Fenced,
    /// The round is over: announced, and the control connection's round
    /// trip measured. The driver decides whether to go on
    /// ([`SourceSession::next_round`]) or pause ([`SourceSession::pause`]).
    RoundTrip(Duration),
    /// The destination's `Ready` came: check it with
    /// [`SourceSession::verify_ready`].
    Ready,
    /// The destination proved it committed (its `Committed` MAC): the guest
    /// is the destination's.
    Committed([u8; 32]),
}

/// The source's side of one migration after `Accept`.
#[derive(Debug, Clone)]
pub struct SourceSession {
    commit_key: MacKey,
    timeout: Duration,
    state: State,
    round: u32,
    pings: u64,
    commit_sent: bool,
}

impl SourceSession {
    /// A session that starts sending round 0, proving with the session's
    /// `commit` key, waiting at most `timeout` for each answer.
    pub fn new(commit: MacKey, timeout: Duration) -> Self {
        SourceSession {
            commit_key: commit,
            timeout,
            state: State::Sending { paused: false },
            round: 0,
            pings: 0,
            commit_sent: false,
        }
    }

    /// The round being sent (the final copy carries the number after the
    /// last pre-copy round).
    pub fn round(&self) -> u32 {
        self.round
    }

    /// True while the source may run its guest again: before `Commit` was
    /// sent, or after the destination proved it refused it.
    pub fn guest_is_ours(&self) -> bool {
        !self.commit_sent
    }

    /// True once the destination proved it committed.
    pub fn is_committed(&self) -> bool {
        matches!(self.state, State::Committed { .. })
    }

    /// True once the session ended on an error or an abort.
    pub fn is_aborted(&self) -> bool {
        self.state == State::Aborted
    }

    fn misuse(&mut self, what: &'static str) -> SessionError {
        let e = SessionError::OutOfOrder {
            event: what,
            state: self.state_name(),
        };
        self.fail();
        e
    }

    fn fail(&mut self) {
        if !matches!(self.state, State::Committed { .. } | State::Refused) {
            self.state = State::Aborted;
        }
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::Sending { paused: false } => "sending a round",
            State::Sending { paused: true } => "sending the final copy",
            State::Fencing { .. } => "fencing",
            State::Announced => "round announced",
            State::AwaitPong { .. } => "awaiting Pong",
            State::Between => "between rounds",
            State::AwaitReady { .. } => "awaiting Ready",
            State::ReadyReceived { .. } => "checking Ready",
            State::Verified { .. } => "verified",
            State::AwaitCommitted { .. } => "awaiting Committed",
            State::Committed { .. } => "committed",
            State::Refused => "commit refused",
            State::Aborted => "aborted",
        }
    }

    /// Every page of the current send was acknowledged (the barrier held).
    /// `lost`: the local addresses of data channels that failed during it;
    /// they may still have older copies in the network, so before anything
    /// else is sent they are fenced: returns the `Fence` to send, after
    /// which the round goes on at `Fenced` ([`Step::Fenced`]).
    pub fn round_flushed(
        &mut self,
        lost: Vec<SocketAddr>,
        now: Instant,
    ) -> Result<Option<Msg>, SessionError> {
        let State::Sending { paused } = self.state else {
            return Err(self.misuse("pages flushed"));
        };
        if lost.is_empty() {
            return Ok(None);
        }
        self.state = State::Fencing {
            paused,
            channels: lost.clone(),
            since: now,
        };
        Ok(Some(Msg::Fence { channels: lost }))
    }

    /// A pre-copy round's pages were all sent and fenced: returns the
    /// `RoundDone` announcing its `pages`.
    pub fn round_done(&mut self, pages: u64) -> Result<Msg, SessionError> {
        if self.state != (State::Sending { paused: false }) {
            return Err(self.misuse("round done"));
        }
        self.state = State::Announced;
        Ok(Msg::RoundDone {
            round: self.round,
            pages,
        })
    }

    /// After `RoundDone`: the `Ping` that measures the control
    /// connection's round trip, sent at `now`.
    pub fn ping(&mut self, now: Instant) -> Result<Msg, SessionError> {
        if self.state != State::Announced {
            return Err(self.misuse("ping"));
        }
        self.pings += 1;
        self.state = State::AwaitPong {
            seq: self.pings,
            sent: now,
        };
        Ok(Msg::Ping { seq: self.pings })
    }

    /// Between rounds: the next pre-copy round begins. Returns its number.
    pub fn next_round(&mut self) -> Result<u32, SessionError> {
        if self.state != State::Between {
            return Err(self.misuse("next round"));
        }
        self.state = State::Sending { paused: false };
        Ok(self.round)
    }

    /// Between rounds: the guest is paused for the final copy. Returns its
    /// round number.
    pub fn pause(&mut self) -> Result<u32, SessionError> {
        if self.state != State::Between {
            return Err(self.misuse("pause"));
        }
        self.state = State::Sending { paused: true };
        Ok(self.round)
    }

    /// The final copy was acknowledged: returns the `Switchover` carrying
    /// the device state, sent at `now`.
    pub fn switchover(
        &mut self,
        device_state: Vec<u8>,
        verify_full: bool,
        now: Instant,
    ) -> Result<Msg, SessionError> {
        if self.state != (State::Sending { paused: true }) {
            return Err(self.misuse("switchover"));
        }
        let hash = proof::device_state_hash(&device_state);
        self.state = State::AwaitReady {
            device_state: hash,
            since: now,
        };
        Ok(Msg::Switchover(Switchover {
            device_state,
            device_state_hash: hash,
            verify_full,
        }))
    }

    /// The hash of the device state sent at switchover (one of the claims).
    pub fn device_state_hash(&self) -> Option<[u8; 32]> {
        match self.state {
            State::AwaitReady { device_state, .. } => Some(device_state),
            _ => None,
        }
    }

    /// Checks the destination's `Ready` against this side's `claims`
    /// (transcripts up to `Switchover`, what was sent for every page, the
    /// device state, the whole memory with `--verify full`). On a match,
    /// `Commit` may be sent ([`SourceSession::commit`]); otherwise the
    /// first claim that differs is the error.
    pub fn verify_ready(&mut self, claims: &Claims) -> Result<(), SessionError> {
        let State::ReadyReceived { ready } = self.state else {
            return Err(self.misuse("verify Ready"));
        };
        if let Err(m) = ready.check(&self.commit_key, claims) {
            self.fail();
            return Err(SessionError::Verification(m));
        }
        self.state = State::Verified {
            commit: proof::commit_mac(&self.commit_key, claims, &ready),
        };
        Ok(())
    }

    /// The point of no return: returns the `Commit` to send at `now`. From
    /// here on the guest is the destination's unless it proves a refusal.
    pub fn commit(&mut self, now: Instant) -> Result<Msg, SessionError> {
        let State::Verified { commit } = self.state else {
            return Err(self.misuse("commit"));
        };
        self.commit_sent = true;
        self.state = State::AwaitCommitted { commit, since: now };
        Ok(Msg::Commit { mac: commit })
    }

    /// After `Committed`: the audit report of the frozen source memory,
    /// sealed with the session's proof.
    pub fn audit(&self, mut report: AuditReport) -> Result<Msg, SessionError> {
        let State::Committed { mac } = self.state else {
            return Err(SessionError::OutOfOrder {
                event: "audit",
                state: self.state_name(),
            });
        };
        report.seal(&self.commit_key, &mac);
        Ok(Msg::Audit(report))
    }

    /// A message from the destination, at `now`.
    pub fn handle(&mut self, msg: Msg, now: Instant) -> Result<Step, SessionError> {
        let r = self.handle_inner(msg, now);
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn handle_inner(&mut self, msg: Msg, now: Instant) -> Result<Step, SessionError> {
        if let State::AwaitCommitted { commit, .. } = self.state {
            return match msg {
                Msg::Committed { mac }
                    if proof::check_committed(&self.commit_key, &commit, &mac) =>
                {
                    self.state = State::Committed { mac };
                    Ok(Step::Committed(mac))
                }
                Msg::Committed { .. } => Err(SessionError::CommitUnconfirmed(
                    "its Committed does not carry this session's proof".into(),
                )),
                Msg::CommitRefused { reason, mac }
                    if proof::check_refusal(&self.commit_key, &commit, &reason, &mac) =>
                {
                    // Proven to come from the destination, about this
                    // Commit: it will not run the guest.
                    self.commit_sent = false;
                    self.state = State::Refused;
                    Err(SessionError::CommitRefused(reason))
                }
                Msg::CommitRefused { reason, .. } => Err(SessionError::CommitUnconfirmed(format!(
                    "a refusal without this session's proof ({reason})"
                ))),
                Msg::Abort { reason } => Err(SessionError::CommitUnconfirmed(format!(
                    "the peer aborted: {reason}"
                ))),
                m => Err(SessionError::CommitUnconfirmed(format!("got {}", m.name()))),
            };
        }
        if let Msg::Abort { reason } = msg {
            return Err(SessionError::PeerAborted(reason));
        }
        match (self.state.clone(), msg) {
            (
                State::Fencing {
                    paused, channels, ..
                },
                Msg::Fenced { channels: done },
            ) if done == channels => {
                self.state = State::Sending { paused };
                Ok(Step::Fenced)
            }
            (State::AwaitPong { seq, sent }, Msg::Pong { seq: s }) if s == seq => {
                let rtt = now.saturating_duration_since(sent);
                self.round += 1;
                self.state = State::Between;
                Ok(Step::RoundTrip(rtt))
            }
            (State::AwaitReady { .. }, Msg::Ready(ready)) => {
                self.state = State::ReadyReceived { ready };
                Ok(Step::Ready)
            }
            (_, m) => Err(SessionError::Unexpected {
                expected: self.expected(),
                got: m.name(),
            }),
        }
    }

    fn expected(&self) -> &'static str {
        match self.state {
            State::Fencing { .. } => "Fenced",
            State::AwaitPong { .. } => "Pong",
            State::AwaitReady { .. } => "Ready",
            State::AwaitCommitted { .. } => "Committed",
            _ => "nothing (no answer is awaited)",
        }
    }

    /// The answer awaited, in words, and by when it must come; `None` when
    /// nothing is awaited (the driver is sending or deciding).
    pub fn poll_timeout(&self) -> Option<(&'static str, Instant)> {
        let (what, since) = match &self.state {
            State::Fencing { since, .. } => ("the destination's Fenced", *since),
            State::AwaitPong { sent, .. } => ("the destination's Pong", *sent),
            State::AwaitReady { since, .. } => ("the destination's Ready", *since),
            State::AwaitCommitted { since, .. } => ("the destination's Committed", *since),
            _ => return None,
        };
        Some((what, since + self.timeout))
    }

    /// The time is `now`: an error once the awaited answer is overdue.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        let Some((what, deadline)) = self.poll_timeout() else {
            return Ok(());
        };
        if now < deadline {
            return Ok(());
        }
        let late = SessionError::Timeout {
            what,
            after: self.timeout,
        };
        let e = match self.state {
            State::AwaitCommitted { .. } => SessionError::CommitUnconfirmed(late.to_string()),
            _ => late,
        };
        self.fail();
        Err(e)
    }

    /// The control connection failed (`detail`): after `Commit`, whether
    /// the destination committed is unknown, and that is the error; before
    /// it, the connection's own error stands (`None`). The session is over
    /// either way.
    pub fn connection_failed(&mut self, detail: String) -> Option<SessionError> {
        let awaiting_commit = matches!(self.state, State::AwaitCommitted { .. });
        self.fail();
        awaiting_commit.then_some(SessionError::CommitUnconfirmed(detail))
    }

    /// The source gives up (`reason`): the `Abort` to tell the destination,
    /// unless `Commit` was sent (then the guest is no longer the source's
    /// to take back, and nothing is said).
    pub fn abort(&mut self, reason: &str) -> Option<Msg> {
        self.fail();
        self.guest_is_ours().then(|| Msg::Abort {
            reason: reason.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::Evidence;

    const T: Duration = Duration::from_secs(5);

    fn key() -> MacKey {
        MacKey::from_bytes([9; 32])
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 2], p))
    }

    fn claims(device_state: [u8; 32]) -> Claims {
        Claims {
            transcripts: Default::default(),
            evidence: Evidence(42),
            device_state,
            memory: None,
        }
    }

    /// An audit report that passed.
    fn report() -> AuditReport {
        AuditReport {
            result: crate::control::AuditResult::Passed,
            pages: 1,
            mismatched_pages: 0,
            first_mismatch: None,
            duration_us: 0,
            pause_predicted: Default::default(),
            pause_actual: Default::default(),
            mac: [0; 32],
        }
    }

    /// A session through one round and the final copy, awaiting Ready.
    fn at_ready(now: Instant) -> (SourceSession, [u8; 32]) {
        let mut s = SourceSession::new(key(), T);
        assert_eq!(s.round_flushed(vec![], now).unwrap(), None);
        s.round_done(3).unwrap();
        let Msg::Ping { seq } = s.ping(now).unwrap() else {
            panic!()
        };
        s.handle(Msg::Pong { seq }, now).unwrap();
        assert_eq!(s.pause().unwrap(), 1);
        s.round_flushed(vec![], now).unwrap();
        let Msg::Switchover(sw) = s.switchover(b"dev".to_vec(), false, now).unwrap() else {
            panic!()
        };
        assert_eq!(s.device_state_hash(), Some(sw.device_state_hash));
        (s, sw.device_state_hash)
    }

    #[test]
    fn a_round_is_announced_and_timed_by_its_ping() {
        let t0 = Instant::now();
        let mut s = SourceSession::new(key(), T);
        assert_eq!(s.round(), 0);
        s.round_flushed(vec![], t0).unwrap();
        assert_eq!(
            s.round_done(7).unwrap(),
            Msg::RoundDone { round: 0, pages: 7 }
        );
        assert_eq!(s.ping(t0).unwrap(), Msg::Ping { seq: 1 });
        assert_eq!(s.poll_timeout(), Some(("the destination's Pong", t0 + T)));
        let later = t0 + Duration::from_millis(3);
        assert_eq!(
            s.handle(Msg::Pong { seq: 1 }, later).unwrap(),
            Step::RoundTrip(Duration::from_millis(3))
        );
        assert_eq!(s.round(), 1);
        assert_eq!(s.next_round().unwrap(), 1);
        assert!(s.guest_is_ours());
    }

    #[test]
    fn a_pong_of_another_ping_or_a_stray_message_ends_the_session() {
        let t0 = Instant::now();
        let mut s = SourceSession::new(key(), T);
        s.round_flushed(vec![], t0).unwrap();
        s.round_done(1).unwrap();
        s.ping(t0).unwrap();
        assert_eq!(
            s.clone().handle(Msg::Pong { seq: 2 }, t0),
            Err(SessionError::Unexpected {
                expected: "Pong",
                got: "Pong"
            })
        );
        assert_eq!(
            s.handle(Msg::Fenced { channels: vec![] }, t0),
            Err(SessionError::Unexpected {
                expected: "Pong",
                got: "Fenced"
            })
        );
        assert!(s.is_aborted());
        assert_eq!(
            s.abort("x"),
            Some(Msg::Abort { reason: "x".into() }),
            "the destination is told"
        );
    }

    #[test]
    fn lost_channels_are_fenced_before_the_round_goes_on() {
        let t0 = Instant::now();
        let mut s = SourceSession::new(key(), T);
        let fence = s.round_flushed(vec![addr(1), addr(2)], t0).unwrap();
        assert_eq!(
            fence,
            Some(Msg::Fence {
                channels: vec![addr(1), addr(2)]
            })
        );
        // Nothing else may be said while fencing.
        assert!(matches!(
            s.clone().round_done(1),
            Err(SessionError::OutOfOrder { .. })
        ));
        // A Fenced for other channels is not the answer.
        assert!(s
            .clone()
            .handle(
                Msg::Fenced {
                    channels: vec![addr(1)]
                },
                t0
            )
            .is_err());
        assert_eq!(
            s.handle(
                Msg::Fenced {
                    channels: vec![addr(1), addr(2)]
                },
                t0
            ),
            Ok(Step::Fenced)
        );
        assert!(s.round_done(1).is_ok());
    }

    #[test]
    fn an_overdue_answer_is_a_timeout_naming_it() {
        let t0 = Instant::now();
        let mut s = SourceSession::new(key(), T);
        s.round_flushed(vec![addr(1)], t0).unwrap();
        assert_eq!(s.handle_timeout(t0 + T - Duration::from_millis(1)), Ok(()));
        assert_eq!(
            s.handle_timeout(t0 + T),
            Err(SessionError::Timeout {
                what: "the destination's Fenced",
                after: T
            })
        );
        assert!(s.is_aborted());
    }

    #[test]
    fn commit_needs_a_ready_that_proves_our_claims() {
        let t0 = Instant::now();
        let (mut s, dev) = at_ready(t0);
        let ours = claims(dev);
        // A Ready over other evidence names the evidence.
        let other = Claims {
            evidence: Evidence(41),
            ..ours
        };
        let mut bad = s.clone();
        bad.handle(Msg::Ready(ReadyProof::new(&key(), &other)), t0)
            .unwrap();
        assert_eq!(
            bad.verify_ready(&ours),
            Err(SessionError::Verification(
                crate::switchover::Mismatch::Evidence
            ))
        );
        assert!(bad.guest_is_ours());
        // Commit before Ready is out of order.
        assert!(s.clone().commit(t0).is_err());
        let ready = ReadyProof::new(&key(), &ours);
        assert_eq!(s.handle(Msg::Ready(ready), t0), Ok(Step::Ready));
        s.verify_ready(&ours).unwrap();
        let Msg::Commit { mac } = s.commit(t0).unwrap() else {
            panic!()
        };
        assert_eq!(mac, proof::commit_mac(&key(), &ours, &ready));
        assert!(!s.guest_is_ours(), "Commit sent: no way back");
        assert_eq!(s.abort("late"), None, "and nothing is said");
    }

    #[test]
    fn only_a_proven_answer_settles_the_commit() {
        let t0 = Instant::now();
        let (mut s, dev) = at_ready(t0);
        let ours = claims(dev);
        let ready = ReadyProof::new(&key(), &ours);
        s.handle(Msg::Ready(ready), t0).unwrap();
        s.verify_ready(&ours).unwrap();
        let Msg::Commit { mac: commit } = s.commit(t0).unwrap() else {
            panic!()
        };
        // A forged Committed, an unproven refusal, a stray message, the
        // connection failing, a timeout: unconfirmed, guest left paused.
        for m in [
            Msg::Committed { mac: [0; 32] },
            Msg::CommitRefused {
                reason: "no".into(),
                mac: [0; 32],
            },
            Msg::Pong { seq: 1 },
        ] {
            let mut c = s.clone();
            assert!(matches!(
                c.handle(m, t0),
                Err(SessionError::CommitUnconfirmed(_))
            ));
            assert!(!c.guest_is_ours());
        }
        assert!(matches!(
            s.clone().connection_failed("reset".into()),
            Some(SessionError::CommitUnconfirmed(_))
        ));
        assert!(matches!(
            s.clone().handle_timeout(t0 + T),
            Err(SessionError::CommitUnconfirmed(_))
        ));
        // A proven refusal gives the guest back.
        let mut r = s.clone();
        let why = "restore failed";
        assert_eq!(
            r.handle(
                Msg::CommitRefused {
                    reason: why.into(),
                    mac: proof::refusal_mac(&key(), &commit, why)
                },
                t0
            ),
            Err(SessionError::CommitRefused(why.into()))
        );
        assert!(r.guest_is_ours());
        // A proven Committed: the guest is the destination's, and the
        // audit is sealed to it.
        let committed = proof::committed_mac(&key(), &commit);
        assert_eq!(
            s.handle(Msg::Committed { mac: committed }, t0),
            Ok(Step::Committed(committed))
        );
        assert!(s.is_committed() && !s.guest_is_ours());
        let Msg::Audit(a) = s.audit(report()).unwrap() else {
            panic!()
        };
        assert!(a.verify(&key(), &committed));
    }

    #[test]
    fn the_driver_cannot_skip_a_step() {
        let t0 = Instant::now();
        let mut s = SourceSession::new(key(), T);
        assert!(s.clone().pause().is_err(), "no pause mid-round");
        assert!(s.clone().ping(t0).is_err(), "no ping before RoundDone");
        assert!(
            s.clone().switchover(vec![], false, t0).is_err(),
            "no switchover before the pause"
        );
        assert!(s.clone().audit(report()).is_err(), "no audit before commit");
        assert_eq!(s.poll_timeout(), None, "nothing awaited while sending");
        assert_eq!(
            s.handle(
                Msg::Abort {
                    reason: "bye".into()
                },
                t0
            ),
            Err(SessionError::PeerAborted("bye".into()))
        );
    }
}
