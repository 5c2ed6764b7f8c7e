//! The destination's migration session as a state machine without IO:
//! after `Accept`, what the source's control messages mean and what is
//! answered (rounds seen, `Ping`/`Pong`, the fence of lost channels), which
//! data channels may still land pages, when the destination has not heard
//! from the source for too long, and the switchover: `Ready` over this
//! side's claims, the check of `Commit`, the device state restored before
//! `Committed`, a proven refusal otherwise, then the source's audit. The
//! driver (`ferry_migration::dest`) receives pages on the data channels,
//! runs the restore and resume hooks and moves frames; it tells this
//! machine what happened, with the time passed in, and does what it
//! returns.
//!
//! ```text
//!  new --> Receiving --RoundDone / Ping (Pong) / tick(progress)--> Receiving
//!            |   ^
//!            |   +--- channel_ended: the last fenced channel closed (Fenced) ---+
//!            |                                                                  |
//!            +--Fence(channels)--> Receiving, fencing (close them) -------------+
//!            |
//!            +--Switchover (device state checked)--> Stopping --ready(claims)--> AwaitCommit
//!                                                                                   |
//!              +--Commit does not prove our claims: CommitRefused sent ---<---------+
//!              |                                                                    |
//!              v                                         Commit proven --> Restoring
//!           Aborted <-- any error, a timeout, no data channel left                  |
//!                                        restore failed: CommitRefused --> Refused  |
//!                                        restored: Committed --> AwaitAudit <-------+
//!                                                                   |
//!                                                    Audit (or none) --> Done
//! ```
//!
//! The guest is resumed here only after `Committed` was sent, which is only
//! after a `Commit` that proves the source holds the same transcripts,
//! evidence and device state, and a restore that succeeded.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::{AuditReport, Msg, Switchover};
use crate::keys::MacKey;
use crate::session::SessionError;
use crate::switchover::{self as proof, Claims, ReadyProof};

/// What the driver must do after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The source finished a round (noted: the source pauses its guest
    /// right after its last one).
    RoundDone {
        /// Its number.
        round: u32,
        /// Pages it carried.
        pages: u64,
    },
    /// Send this answer.
    Send(Msg),
    /// The source lost these data channels: close the ones in `close`
    /// (each reports its end through [`DestSession::channel_ended`]); a
    /// fenced channel that arrives later is refused
    /// ([`DestSession::channel_opened`]). `reply`: the `Fenced` to send now
    /// when none of them was open.
    Fence {
        /// Every channel the `Fence` named.
        channels: Vec<SocketAddr>,
        /// The open ones among them, to close.
        close: Vec<SocketAddr>,
        /// `Fenced`, when nothing is left to wait for.
        reply: Option<Msg>,
    },
    /// Switchover: stop every data channel, then prove what landed with
    /// [`DestSession::ready`].
    Switchover,
    /// The source's `Commit` proves our claims: restore the device state,
    /// then report with [`DestSession::restored`] or
    /// [`DestSession::restore_failed`].
    Restore,
    /// The source's audit after the pause: `Some` with this session's proof,
    /// `None` when it carries none (ignored).
    Audit(Option<AuditReport>),
}

/// What a data channel's end means for the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEnd {
    /// The others carry on.
    CarryOn,
    /// It was the last fenced channel to close: send this `Fenced`.
    Send(Msg),
    /// It failed and no channel is left that is not being fenced: the
    /// migration is lost (the channel's own error says why).
    NoneLeft,
}

/// How a data channel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOutcome {
    /// It received its end frame.
    Finished,
    /// It failed (an error on it).
    Failed,
    /// It was closed here (fenced or stopped).
    Closed,
}

// One per migration: the size of its largest state (the claims and the
// Ready it must check Commit against) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Receiving,
    Stopping,
    AwaitCommit {
        claims: Claims,
        ready: ReadyProof,
        since: Instant,
    },
    Restoring {
        expected: [u8; 32],
    },
    AwaitAudit {
        committed: [u8; 32],
        since: Instant,
    },
    Done,
    /// The source's `Commit` did not prove our claims: the refusal is
    /// bound to the `Commit` it should have sent.
    Disproved {
        expected: [u8; 32],
    },
    Refused,
    Aborted,
}

/// The destination's side of one migration after `Accept`.
#[derive(Debug, Clone)]
pub struct DestSession {
    commit_key: MacKey,
    timeout: Duration,
    state: State,
    switchover: Option<Switchover>,
    /// A `Fence` being answered: its channels, and those still closing.
    fencing: Option<(Vec<SocketAddr>, BTreeSet<SocketAddr>)>,
    fenced: BTreeSet<SocketAddr>,
    live: BTreeSet<SocketAddr>,
    opened: u16,
    finished: u16,
    /// When the source last showed progress, and the progress counter then.
    last_progress: (Instant, u64),
    /// The last `RoundDone` (the source pauses right after its last round).
    paused_at: Instant,
}

impl DestSession {
    /// A session that starts receiving at `now`, checking with the
    /// session's `commit` key, giving the source `timeout` to show progress
    /// or answer.
    pub fn new(commit: MacKey, timeout: Duration, now: Instant) -> Self {
        DestSession {
            commit_key: commit,
            timeout,
            state: State::Receiving,
            switchover: None,
            fencing: None,
            fenced: BTreeSet::new(),
            live: BTreeSet::new(),
            opened: 0,
            finished: 0,
            last_progress: (now, 0),
            paused_at: now,
        }
    }

    fn fail(&mut self) {
        if !matches!(
            self.state,
            State::Done | State::Refused | State::Disproved { .. }
        ) {
            self.state = State::Aborted;
        }
    }

    fn misuse(&mut self, event: &'static str) -> SessionError {
        let e = SessionError::OutOfOrder {
            event,
            state: self.state_name(),
        };
        self.fail();
        e
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::Receiving => "receiving",
            State::Stopping => "stopping the data channels",
            State::AwaitCommit { .. } => "awaiting Commit",
            State::Restoring { .. } => "restoring",
            State::AwaitAudit { .. } => "awaiting the audit",
            State::Done => "done",
            State::Disproved { .. } | State::Refused => "commit refused",
            State::Aborted => "aborted",
        }
    }

    /// True while pages may still land (before `Switchover`).
    pub fn is_receiving(&self) -> bool {
        self.state == State::Receiving
    }

    /// True once `Committed` was sent (the guest is this side's).
    pub fn is_committed(&self) -> bool {
        matches!(self.state, State::AwaitAudit { .. } | State::Done)
    }

    /// True once the session ended on an error.
    pub fn is_aborted(&self) -> bool {
        self.state == State::Aborted
    }

    /// Data channels opened and finished (with their end frame) so far.
    pub fn channels(&self) -> (u16, u16) {
        (self.opened, self.finished)
    }

    /// The source's `Switchover` (device state), once it came.
    pub fn switchover(&self) -> Option<&Switchover> {
        self.switchover.as_ref()
    }

    /// A data channel from `peer` was admitted: true if it may receive
    /// (false: it was fenced, drop it).
    pub fn channel_opened(&mut self, peer: SocketAddr) -> bool {
        if self.fenced.contains(&peer) || self.state != State::Receiving {
            return false;
        }
        self.opened += 1;
        self.live.insert(peer);
        true
    }

    /// The data channel from `peer` ended (`None`: its address was not
    /// known).
    pub fn channel_ended(&mut self, peer: Option<SocketAddr>, how: ChannelOutcome) -> ChannelEnd {
        if let Some(p) = peer {
            self.live.remove(&p);
        }
        match how {
            ChannelOutcome::Finished => self.finished += 1,
            ChannelOutcome::Failed if self.none_left() => {
                self.fail();
                return ChannelEnd::NoneLeft;
            }
            ChannelOutcome::Failed | ChannelOutcome::Closed => {}
        }
        if let (Some((_, waiting)), Some(p)) = (self.fencing.as_mut(), peer) {
            waiting.remove(&p);
        }
        match self.fencing.take() {
            Some((channels, waiting)) if waiting.is_empty() => {
                ChannelEnd::Send(Msg::Fenced { channels })
            }
            f => {
                self.fencing = f;
                ChannelEnd::CarryOn
            }
        }
    }

    /// No channel is left that is not fenced or being fenced.
    fn none_left(&self) -> bool {
        self.live.iter().all(|p| {
            self.fenced.contains(p) || self.fencing.as_ref().is_some_and(|(_, w)| w.contains(p))
        })
    }

    /// A message from the source, at `now`.
    pub fn handle(&mut self, msg: Msg, now: Instant) -> Result<Step, SessionError> {
        let r = self.handle_inner(msg, now);
        if r.is_err() {
            self.fail();
        }
        r
    }

    fn handle_inner(&mut self, msg: Msg, now: Instant) -> Result<Step, SessionError> {
        if let State::AwaitAudit { committed, .. } = self.state {
            // After the pause the audit is a report, not a step of the
            // protocol: anything else ends the session the same way.
            self.state = State::Done;
            return Ok(Step::Audit(match msg {
                Msg::Audit(a) if a.verify(&self.commit_key, &committed) => Some(a),
                _ => None,
            }));
        }
        if let Msg::Abort { reason } = msg {
            return Err(SessionError::PeerAborted(reason));
        }
        match (&self.state, msg) {
            (State::Receiving, Msg::RoundDone { round, pages }) => {
                self.last_progress.0 = now;
                self.paused_at = now;
                Ok(Step::RoundDone { round, pages })
            }
            (State::Receiving, Msg::Ping { seq }) => {
                self.last_progress.0 = now;
                Ok(Step::Send(Msg::Pong { seq }))
            }
            (State::Receiving, Msg::Fence { channels }) if self.fencing.is_none() => {
                self.last_progress.0 = now;
                self.fenced.extend(channels.iter().copied());
                let close: Vec<SocketAddr> = channels
                    .iter()
                    .copied()
                    .filter(|p| self.live.contains(p))
                    .collect();
                if close.is_empty() {
                    return Ok(Step::Fence {
                        channels: channels.clone(),
                        close,
                        reply: Some(Msg::Fenced { channels }),
                    });
                }
                self.fencing = Some((channels.clone(), close.iter().copied().collect()));
                Ok(Step::Fence {
                    channels,
                    close,
                    reply: None,
                })
            }
            (State::Receiving, Msg::Switchover(sw)) if self.fencing.is_none() => {
                self.last_progress.0 = now;
                if proof::device_state_hash(&sw.device_state) != sw.device_state_hash {
                    return Err(SessionError::DeviceStateCorrupt);
                }
                self.switchover = Some(sw);
                self.state = State::Stopping;
                Ok(Step::Switchover)
            }
            (State::AwaitCommit { claims, ready, .. }, Msg::Commit { mac }) => {
                let expected = proof::commit_mac(&self.commit_key, claims, ready);
                if !proof::check_commit(&self.commit_key, claims, ready, &mac) {
                    self.state = State::Disproved { expected };
                    return Err(SessionError::CommitProof);
                }
                self.state = State::Restoring { expected };
                Ok(Step::Restore)
            }
            (State::Receiving, m) => Err(SessionError::Unexpected {
                expected: "RoundDone, Ping, Fence or Switchover",
                got: m.name(),
            }),
            (State::AwaitCommit { .. }, m) => Err(SessionError::Unexpected {
                expected: "Commit",
                got: m.name(),
            }),
            (_, m) => Err(SessionError::Unexpected {
                expected: "nothing (no message is awaited)",
                got: m.name(),
            }),
        }
    }

    /// The session ends here on an error (`reason`): what to tell the
    /// source. Before the switchover's proofs, `Abort`; after a `Commit`
    /// that did not prove our claims, a refusal bound to the `Commit` it
    /// should have sent (the source may resume its guest); after
    /// `Committed` or a refusal, nothing.
    pub fn abort(&mut self, reason: &str) -> Option<Msg> {
        match self.state {
            State::Disproved { expected } => {
                self.state = State::Refused;
                Some(Msg::CommitRefused {
                    mac: proof::refusal_mac(&self.commit_key, &expected, reason),
                    reason: reason.to_string(),
                })
            }
            State::AwaitAudit { .. } | State::Done | State::Refused => None,
            _ => {
                self.state = State::Aborted;
                Some(Msg::Abort {
                    reason: reason.to_string(),
                })
            }
        }
    }

    /// Every data channel is stopped: proves `claims` (the transcripts up to
    /// `Switchover`, what landed on every page, the device state's hash,
    /// the whole memory with `--verify full`) with the `Ready` to send at
    /// `now`.
    pub fn ready(&mut self, claims: Claims, now: Instant) -> Result<Msg, SessionError> {
        if self.state != State::Stopping {
            return Err(self.misuse("ready"));
        }
        let ready = ReadyProof::new(&self.commit_key, &claims);
        self.state = State::AwaitCommit {
            claims,
            ready,
            since: now,
        };
        Ok(Msg::Ready(ready))
    }

    /// The device state was restored at `now`: returns the `Committed` to
    /// send (the guest is this side's from here on) and the pause so far
    /// (since the source's last `RoundDone`).
    pub fn restored(&mut self, now: Instant) -> Result<(Msg, Duration), SessionError> {
        let State::Restoring { expected } = self.state else {
            return Err(self.misuse("restored"));
        };
        let committed = proof::committed_mac(&self.commit_key, &expected);
        self.state = State::AwaitAudit {
            committed,
            since: now,
        };
        Ok((
            Msg::Committed { mac: committed },
            now.saturating_duration_since(self.paused_at),
        ))
    }

    /// The restore failed (`reason`): returns the proven refusal to send;
    /// the guest stays the source's.
    pub fn restore_failed(&mut self, reason: &str) -> Result<Msg, SessionError> {
        let State::Restoring { expected } = self.state else {
            return Err(self.misuse("restore failed"));
        };
        self.state = State::Refused;
        Ok(Msg::CommitRefused {
            mac: proof::refusal_mac(&self.commit_key, &expected, reason),
            reason: reason.to_string(),
        })
    }

    /// The `Committed` MAC sent, once committed (the fingerprint both
    /// sides print is derived from it).
    pub fn committed(&self) -> Option<[u8; 32]> {
        match self.state {
            State::AwaitAudit { committed, .. } => Some(committed),
            _ => None,
        }
    }

    /// The answer awaited, in words, and by when it must come; `None`
    /// while receiving (see [`DestSession::tick`]) or when nothing is
    /// awaited.
    pub fn poll_timeout(&self) -> Option<(&'static str, Instant)> {
        match self.state {
            State::AwaitCommit { since, .. } => Some(("Commit", since + self.timeout)),
            State::AwaitAudit { since, .. } => {
                Some(("the source's audit report", since + self.timeout))
            }
            _ => None,
        }
    }

    /// The time is `now`. While receiving, `progress` counts what the data
    /// channels received so far: the source must show progress (pages or
    /// control messages) within the timeout. Otherwise an overdue answer
    /// ends the session (the audit only ends it: it is a report).
    pub fn tick(&mut self, now: Instant, progress: u64) -> Result<(), SessionError> {
        if self.state == State::Receiving {
            if progress != self.last_progress.1 {
                self.last_progress = (now, progress);
                return Ok(());
            }
            if now.saturating_duration_since(self.last_progress.0) > self.timeout {
                self.fail();
                return Err(SessionError::Timeout {
                    what: "pages or messages from the source",
                    after: self.timeout,
                });
            }
            return Ok(());
        }
        let Some((what, deadline)) = self.poll_timeout() else {
            return Ok(());
        };
        if now < deadline {
            return Ok(());
        }
        if matches!(self.state, State::AwaitAudit { .. }) {
            self.state = State::Done;
            return Ok(());
        }
        self.fail();
        Err(SessionError::Timeout {
            what,
            after: self.timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::Evidence;

    const T: Duration = Duration::from_secs(5);

    fn key() -> MacKey {
        MacKey::from_bytes([8; 32])
    }

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 3], p))
    }

    fn switchover(state: &[u8]) -> Msg {
        Msg::Switchover(Switchover {
            device_state: state.to_vec(),
            device_state_hash: proof::device_state_hash(state),
            verify_full: false,
        })
    }

    fn claims() -> Claims {
        Claims {
            transcripts: Default::default(),
            evidence: Evidence(7),
            device_state: proof::device_state_hash(b"dev"),
            memory: None,
        }
    }

    #[test]
    fn the_source_must_show_progress_within_the_timeout() {
        let t0 = Instant::now();
        let mut d = DestSession::new(key(), T, t0);
        // Pages arriving count as progress.
        d.tick(t0 + T, 1).unwrap();
        d.tick(t0 + 2 * T, 1).unwrap();
        // A Ping too.
        d.handle(Msg::Ping { seq: 4 }, t0 + 2 * T).unwrap();
        d.tick(t0 + 3 * T, 1).unwrap();
        assert_eq!(
            d.tick(t0 + 3 * T + Duration::from_millis(1), 1),
            Err(SessionError::Timeout {
                what: "pages or messages from the source",
                after: T
            })
        );
        assert!(d.is_aborted());
    }

    #[test]
    fn a_fence_waits_for_its_open_channels_and_blocks_the_switchover() {
        let t0 = Instant::now();
        let mut d = DestSession::new(key(), T, t0);
        assert!(d.channel_opened(addr(1)) && d.channel_opened(addr(2)));
        let step = d
            .handle(
                Msg::Fence {
                    channels: vec![addr(1), addr(3)],
                },
                t0,
            )
            .unwrap();
        assert_eq!(
            step,
            Step::Fence {
                channels: vec![addr(1), addr(3)],
                close: vec![addr(1)],
                reply: None
            }
        );
        // While fencing: no second Fence, no Switchover.
        assert!(d
            .clone()
            .handle(
                Msg::Fence {
                    channels: vec![addr(2)]
                },
                t0
            )
            .is_err());
        assert!(d.clone().handle(switchover(b"dev"), t0).is_err());
        // The other channel ending changes nothing; the fenced one closing
        // answers the fence.
        assert_eq!(
            d.channel_ended(Some(addr(2)), ChannelOutcome::Finished),
            ChannelEnd::CarryOn
        );
        assert_eq!(
            d.channel_ended(Some(addr(1)), ChannelOutcome::Closed),
            ChannelEnd::Send(Msg::Fenced {
                channels: vec![addr(1), addr(3)]
            })
        );
        // Fenced channels never come back.
        assert!(!d.channel_opened(addr(1)));
        assert!(!d.channel_opened(addr(3)));
        assert_eq!(d.channels(), (2, 1));
        assert_eq!(d.handle(switchover(b"dev"), t0), Ok(Step::Switchover));
    }

    #[test]
    fn a_failed_channel_is_fatal_only_when_none_is_left() {
        let t0 = Instant::now();
        let mut d = DestSession::new(key(), T, t0);
        d.channel_opened(addr(1));
        d.channel_opened(addr(2));
        assert_eq!(
            d.channel_ended(Some(addr(1)), ChannelOutcome::Failed),
            ChannelEnd::CarryOn
        );
        assert_eq!(
            d.channel_ended(Some(addr(2)), ChannelOutcome::Failed),
            ChannelEnd::NoneLeft
        );
        assert!(d.is_aborted());
    }

    #[test]
    fn a_device_state_that_does_not_match_its_hash_is_refused() {
        let mut d = DestSession::new(key(), T, Instant::now());
        let Msg::Switchover(mut sw) = switchover(b"dev") else {
            panic!()
        };
        sw.device_state[0] ^= 1;
        assert_eq!(
            d.handle(Msg::Switchover(sw), Instant::now()),
            Err(SessionError::DeviceStateCorrupt)
        );
        assert_eq!(
            d.abort("corrupt"),
            Some(Msg::Abort {
                reason: "corrupt".into()
            })
        );
    }

    #[test]
    fn only_a_commit_over_our_claims_restores_and_committed_binds_it() {
        let t0 = Instant::now();
        let mut d = DestSession::new(key(), T, t0);
        d.handle(Msg::RoundDone { round: 3, pages: 1 }, t0).unwrap();
        d.handle(switchover(b"dev"), t0).unwrap();
        assert!(!d.is_receiving());
        assert!(
            !d.channel_opened(addr(5)),
            "no channel after the switchover"
        );
        let ours = claims();
        let Msg::Ready(ready) = d.ready(ours, t0).unwrap() else {
            panic!()
        };
        assert_eq!(d.poll_timeout(), Some(("Commit", t0 + T)));
        let good = proof::commit_mac(&key(), &ours, &ready);
        // Another Commit: refused, with a refusal bound to the right one.
        let mut bad = d.clone();
        let mut forged = good;
        forged[0] ^= 1;
        assert_eq!(
            bad.handle(Msg::Commit { mac: forged }, t0),
            Err(SessionError::CommitProof)
        );
        let Some(Msg::CommitRefused { reason, mac }) = bad.abort("no") else {
            panic!()
        };
        assert!(proof::check_refusal(&key(), &good, &reason, &mac));
        assert!(!bad.is_committed());
        // A late Commit times out.
        assert!(matches!(
            d.clone().tick(t0 + T, 0),
            Err(SessionError::Timeout { what: "Commit", .. })
        ));
        // The right one: restore, then Committed bound to it.
        assert_eq!(d.handle(Msg::Commit { mac: good }, t0), Ok(Step::Restore));
        let mut failed = d.clone();
        let Msg::CommitRefused { reason, mac } = failed.restore_failed("disk").unwrap() else {
            panic!()
        };
        assert!(proof::check_refusal(&key(), &good, &reason, &mac));
        assert_eq!(failed.abort("x"), None, "the refusal was the last word");
        let later = t0 + Duration::from_millis(30);
        let (Msg::Committed { mac }, pause) = d.restored(later).unwrap() else {
            panic!()
        };
        assert!(proof::check_committed(&key(), &good, &mac));
        assert_eq!(pause, Duration::from_millis(30), "since the last RoundDone");
        assert!(d.is_committed());
        assert_eq!(d.abort("x"), None, "committed: nothing to take back");
    }
}
