//! Arbitrary event sequences for the migration sessions
//! ([`crate::source::SourceSession`], [`crate::dest::DestSession`]): the
//! fuzz target `session` and the conformance tests feed bytes here. Each
//! byte picks an event (a driver step, a message made from the bytes that
//! follow, time passing, or a message of one session handed to the other),
//! so both honest runs and hostile ones are reached. It never panics, and
//! checks what must hold whatever the peer sends: neither side believes a
//! commit that the other did not make, and the source gives up its guest
//! only by sending `Commit`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::{AuditReport, AuditResult, Msg, Switchover};
use crate::dest::{self, ChannelOutcome, DestSession};
use crate::evidence::Evidence;
use crate::keys::MacKey;
use crate::source::{self, SourceSession};
use crate::switchover::{Claims, ReadyProof, Transcripts};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, _| (v << 8) | u64::from(self.u8()))
    }
    fn mac(&mut self) -> [u8; 32] {
        let mut m = [0; 32];
        // Mostly zero: a few bytes vary (a valid MAC is out of reach anyway).
        m[0] = self.u8();
        m[31] = self.u8();
        m
    }
    fn addrs(&mut self) -> Vec<SocketAddr> {
        let n = self.u8() % 4;
        (0..n).map(|_| addr(self.u8() % 4)).collect()
    }
    fn claims(&mut self) -> Claims {
        Claims {
            transcripts: Transcripts::default(),
            evidence: Evidence(u128::from(self.u8() % 2)),
            device_state: [self.u8() % 2; 32],
            memory: (self.u8() % 2 == 1).then_some(Evidence(0)),
        }
    }
    fn msg(&mut self, key: &MacKey) -> Msg {
        match self.u8() % 13 {
            0 => Msg::Fence {
                channels: self.addrs(),
            },
            1 => Msg::Fenced {
                channels: self.addrs(),
            },
            2 => Msg::RoundDone {
                round: u32::from(self.u8()),
                pages: self.u64(),
            },
            3 => Msg::Ping {
                seq: u64::from(self.u8()),
            },
            4 => Msg::Pong {
                seq: u64::from(self.u8()),
            },
            5 => {
                let device_state = vec![self.u8(); usize::from(self.u8() % 8)];
                let honest = self.u8() & 1 == 0;
                Msg::Switchover(Switchover {
                    device_state_hash: if honest {
                        crate::switchover::device_state_hash(&device_state)
                    } else {
                        [0; 32]
                    },
                    device_state,
                    verify_full: self.u8() % 2 == 1,
                })
            }
            // A Ready over claims the source may or may not hold.
            6 => Msg::Ready(ReadyProof::new(key, &self.claims())),
            7 => Msg::Commit { mac: self.mac() },
            8 => Msg::Committed { mac: self.mac() },
            9 => Msg::CommitRefused {
                reason: "no".into(),
                mac: self.mac(),
            },
            10 => Msg::Audit(AuditReport {
                result: AuditResult::Passed,
                pages: self.u64(),
                mismatched_pages: 0,
                first_mismatch: None,
                duration_us: 0,
                pause_predicted: Default::default(),
                pause_actual: Default::default(),
                mac: self.mac(),
            }),
            11 => Msg::Abort {
                reason: "fuzz".into(),
            },
            _ => Msg::Welcome { proof: self.mac() },
        }
    }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 5000 + u16::from(i)))
}

/// Runs the events `data` describes against a source and a destination
/// session of one key, on simulated time from `start` (the caller's clock:
/// the protocol core reads none); returns whether each side ended
/// committed. Panics only if an invariant breaks (what a fuzzer reports).
pub fn fuzz_sessions(data: &[u8], start: Instant) -> (bool, bool) {
    let key = MacKey::from_bytes([3; 32]);
    let timeout = Duration::from_secs(5);
    let mut now = start;
    let mut s = SourceSession::new(key.clone(), timeout);
    let mut d = DestSession::new(key.clone(), timeout, now);
    let mut b = Bytes(data);
    // Messages each side produced, not yet handed to the other.
    let (mut to_dest, mut to_source): (Vec<Msg>, Vec<Msg>) = (Vec::new(), Vec::new());
    let (mut commit_sent, mut committed_sent) = (false, false);
    let mut progress = 0u64;
    while !b.0.is_empty() {
        let op = b.u8() % 20;
        match op {
            0 => {
                let lost = b.addrs();
                if let Ok(Some(m)) = s.round_flushed(lost, now) {
                    to_dest.push(m);
                }
            }
            1 => {
                if let Ok(m) = s.round_done(u64::from(b.u8())) {
                    to_dest.push(m);
                }
            }
            2 => {
                if let Ok(m) = s.ping(now) {
                    to_dest.push(m);
                }
            }
            3 => {
                let _ = s.next_round();
            }
            4 => {
                let _ = s.pause();
            }
            5 => {
                if let Ok(m) = s.switchover(vec![b.u8()], b.u8() % 2 == 1, now) {
                    to_dest.push(m);
                }
            }
            6 => {
                let c = b.claims();
                let _ = s.verify_ready(&c);
            }
            7 => {
                if let Ok(m) = s.commit(now) {
                    commit_sent = true;
                    to_dest.push(m);
                }
            }
            8 => {
                let m = b.msg(&key);
                if let Ok(source::Step::Committed(_)) = s.handle(m, now) {
                    unreachable!("a forged Committed was believed");
                }
            }
            9 => {
                let m = b.msg(&key);
                if let Ok(dest::Step::Restore) = d.handle(m, now) {
                    unreachable!("a forged Commit was believed");
                }
            }
            10 => {
                let _ = d.channel_opened(addr(b.u8() % 4));
            }
            11 => {
                let how = match b.u8() % 3 {
                    0 => ChannelOutcome::Finished,
                    1 => ChannelOutcome::Failed,
                    _ => ChannelOutcome::Closed,
                };
                if let dest::ChannelEnd::Send(m) = d.channel_ended(Some(addr(b.u8() % 4)), how) {
                    to_source.push(m);
                }
            }
            12 => {
                let c = b.claims();
                if let Ok(m) = d.ready(c, now) {
                    to_source.push(m);
                }
            }
            13 => {
                if let Ok((m, _)) = d.restored(now) {
                    committed_sent = true;
                    to_source.push(m);
                }
            }
            14 => {
                if let Ok(m) = d.restore_failed("restore failed") {
                    to_source.push(m);
                }
            }
            15 => {
                now += Duration::from_millis(u64::from(b.u8()) * 100);
                let _ = s.handle_timeout(now);
                progress += u64::from(b.u8() % 2);
                let _ = d.tick(now, progress);
            }
            16 => {
                if let Some(m) = s.abort("fuzz") {
                    to_dest.push(m);
                }
            }
            17 => {
                if let Some(m) = d.abort("fuzz") {
                    to_source.push(m);
                }
            }
            // Hand over what the other side said (honest runs).
            18 => {
                if !to_dest.is_empty() {
                    let m = to_dest.remove(0);
                    match d.handle(m, now) {
                        Ok(dest::Step::Send(a)) => to_source.push(a),
                        Ok(dest::Step::Fence { reply: Some(a), .. }) => to_source.push(a),
                        _ => {}
                    }
                }
            }
            _ => {
                if !to_source.is_empty() {
                    let m = to_source.remove(0);
                    let _ = s.handle(m, now);
                }
            }
        }
        // Whatever came, in whatever order: the source gives its guest up
        // only by sending Commit, believes a commit only the destination
        // made, and the destination commits only after a Commit.
        assert!(s.guest_is_ours() || commit_sent);
        assert!(!s.is_committed() || committed_sent);
        assert!(!d.is_committed() || commit_sent);
    }
    (s.is_committed(), d.is_committed())
}
