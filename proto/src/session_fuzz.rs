//! Arbitrary event sequences for the migration sessions
//! ([`crate::source::SourceSession`], [`crate::dest::DestSession`]): the
//! fuzz target `session` and the conformance tests feed bytes here. Each
//! byte picks an event (a driver step, a message made from the bytes that
//! follow, time passing, or a message of one session handed to the other),
//! so both honest runs and hostile ones are reached. It never panics, and
//! checks what must hold whatever the peer sends: neither side believes a
//! commit that the other did not make, and the source gives up its guest
//! only by sending `Commit`.
//!
//! [`fuzz_opening`] does the same for the opening before them
//! ([`crate::opening`]): hellos, the destination's flags, offers (valid or
//! not), out-of-turn steps and answers; the destination accepts only an
//! authenticated offer that a naive check of its own finds admissible.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::control::{
    AuditReport, AuditResult, GuestConfig, Msg, Offer, Role, Switchover, PROTOCOL_MAX, PROTOCOL_MIN,
};
use crate::dest::{self, ChannelOutcome, DestSession};
use crate::evidence::Evidence;
use crate::keys::MacKey;
use crate::layout::MemoryLayout;
use crate::opening::{Admission, DestOpening, GuestSupport, OfferError, Offered, SourceOpening};
use crate::option::PerformanceOption;
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

impl<'a> Bytes<'a> {
    /// The next `n` bytes on their own (fewer at the end): a field of fixed
    /// width, whatever of it the reader uses.
    fn take(&mut self, n: usize) -> Bytes<'a> {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        Bytes(head)
    }

    /// An offer, from 20 bytes.
    fn offer(&mut self) -> Offer {
        let regions: Vec<(u64, u64)> = (0..self.u8() % 4)
            .map(|_| {
                // Page aligned (layout checks are fuzzed by the `offer`
                // target), sometimes empty or overlapping; up to 8 GiB.
                let gpa = u64::from(self.u8()) << (12 + self.u8() % 24);
                let size = u64::from(self.u8() % 17) << (12 + self.u8() % 18);
                (gpa, size)
            })
            .collect();
        Offer {
            layout: MemoryLayout::from_regions(regions),
            guest: GuestConfig {
                vcpus: u32::from(self.u8() % 10),
                cpu_vendor: ["GenuineIntel", "AuthenticAMD"][usize::from(self.u8() % 4 / 3)].into(),
                device_state_format: ["v1", "v2"][usize::from(self.u8() % 4 / 3)].into(),
            },
            option: match self.u8() % 4 {
                0 | 1 => PerformanceOption::Tcp,
                2 => PerformanceOption::Compression {
                    codec: self.u8() % 4,
                    level: i32::from(self.u8() % 24) - 2,
                },
                _ => PerformanceOption::Rdma,
            },
            channels: u16::from(self.u8() % 80),
        }
    }

    fn opening_msg(&mut self) -> Msg {
        match self.u8() % 6 {
            // Versions around ours.
            0 | 1 => Msg::Hello {
                min_version: (PROTOCOL_MIN + u16::from(self.u8() % 3)).saturating_sub(1),
                max_version: (PROTOCOL_MAX + u16::from(self.u8() % 3)).saturating_sub(1),
                role: if !self.u8().is_multiple_of(4) {
                    Role::Control
                } else {
                    Role::Data
                },
                nonce: self.mac(),
            },
            2 | 3 => Msg::Offer(self.take(OFFER).offer()),
            4 => Msg::Accept(crate::control::Accept {
                migration_id: self.u64(),
                interfaces: vec![],
            }),
            _ => self.msg(&MacKey::from_bytes([0; 32])),
        }
    }
}

/// The bytes an offer is made from.
const OFFER: usize = 20;

/// A naive oracle of what a destination may admit: every rule of
/// [`DestOpening::check`] restated from the flags, not from its code.
fn admissible(a: &Admission, o: &Offer, encrypted: bool) -> bool {
    let r = &o.layout.regions;
    let aligned = r
        .iter()
        .all(|r| r.size > 0 && r.gpa % 4096 == 0 && r.size % 4096 == 0);
    let ordered = r.windows(2).all(|w| {
        w[0].gpa
            .checked_add(w[0].size)
            .is_some_and(|e| e <= w[1].gpa)
    });
    let total: u128 = r.iter().map(|r| u128::from(r.size)).sum();
    let option = match o.option {
        PerformanceOption::Tcp => true,
        PerformanceOption::Compression { codec: 1, level } => level == 0,
        PerformanceOption::Compression { codec: 2, level } => (1..=19).contains(&level),
        PerformanceOption::Compression { .. } => false,
        PerformanceOption::Rdma => a.rdma && a.plaintext_allowed && encrypted,
    };
    let s = &a.supports;
    !r.is_empty()
        && aligned
        && ordered
        && total <= u128::from(a.memory_limit)
        && option
        && (1..=s.max_vcpus).contains(&o.guest.vcpus)
        && s.cpu_vendor
            .as_ref()
            .is_none_or(|v| *v == o.guest.cpu_vendor)
        && s.device_state_formats
            .contains(&o.guest.device_state_format)
        && (1..=64).contains(&o.channels)
}

/// Runs the events `data` describes against a destination's opening (its
/// flags from the first bytes) and a source's: hellos, the handshake's
/// outcome, offers, accepts and answers in any order. Returns whether the
/// destination took an offer, and whether both ended accepted. Panics only if an invariant breaks: a hello taken on a
/// connection or at a version the destination does not admit, an offer
/// accepted before authentication or that the naive check refuses, the
/// source accepting anything but an `Accept`.
pub fn fuzz_opening(data: &[u8]) -> (bool, bool) {
    let mut b = Bytes(data);
    let flags = b.u8();
    let admission = Admission {
        plaintext_allowed: flags & 1 == 1,
        rdma: flags & 2 == 2,
        memory_limit: u64::from(b.u8()) << 26,
        supports: GuestSupport {
            max_vcpus: u32::from(b.u8() % 9),
            cpu_vendor: (flags & 4 == 4).then(|| "GenuineIntel".into()),
            device_state_formats: vec!["v1".into()],
        },
    };
    let encrypted = flags & 8 == 8;
    let mut d = DestOpening::new(admission.clone());
    let (mut s, mut to_dest) = SourceOpening::new(b.take(OFFER).offer(), None);
    let mut to_source: Vec<Msg> = Vec::new();
    let (mut control_hello, mut authenticated) = (false, false);
    let mut taken: Option<Offer> = None;
    while !b.0.is_empty() {
        match b.u8() % 6 {
            0 => {
                let m = b.opening_msg();
                let honest = matches!(m, Msg::Hello { min_version, max_version, .. }
                    if min_version <= PROTOCOL_MAX && max_version >= PROTOCOL_MIN.max(min_version));
                match d.on_hello(m, encrypted) {
                    Ok(h) => {
                        assert!(honest, "a hello without a common version was taken");
                        assert!(encrypted || admission.plaintext_allowed);
                        assert!((PROTOCOL_MIN..=PROTOCOL_MAX).contains(&h.version));
                        control_hello = h.role == Role::Control;
                    }
                    Err(r) => to_source.push(r.refusal().reject()),
                }
            }
            1 => authenticated |= d.authenticated().is_ok(),
            2 => {
                let m = if to_dest.is_empty() {
                    b.opening_msg()
                } else {
                    to_dest.remove(0)
                };
                match d.on_offer(m, encrypted) {
                    Ok(Offered::Migration(o)) => {
                        assert!(control_hello && authenticated, "an offer taken out of turn");
                        assert!(admissible(&admission, &o, encrypted), "{o:?} taken");
                        taken = Some(o);
                    }
                    Ok(Offered::Relay(_)) => unreachable!("no relay offer is made here"),
                    Err(OfferError::Refused(r)) => to_source.push(r.reject()),
                    Err(OfferError::Session(_)) => {}
                }
            }
            3 => {
                if let Ok(m) = d.accept(b.u64(), vec![]) {
                    assert!(taken.is_some(), "accepted without an offer taken");
                    to_source.push(m);
                }
            }
            4 => {
                let m = if to_source.is_empty() {
                    b.opening_msg()
                } else {
                    to_source.remove(0)
                };
                let was_accept = matches!(m, Msg::Accept(_));
                if s.on_answer(m).is_ok() {
                    assert!(was_accept);
                }
            }
            _ => to_dest.push(b.opening_msg()),
        }
        assert!(!d.is_accepted() || taken.is_some());
    }
    (taken.is_some(), s.is_accepted() && d.is_accepted())
}

/// Pseudo-random input number `n` of `len` bytes (SHA-256 in counter
/// mode: the same inputs on every run), for the tests that run the fuzz
/// drivers without a fuzzer.
pub fn pseudo_random(n: u32, len: usize) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut bytes = Vec::with_capacity(len + 32);
    let mut block = 0u32;
    while bytes.len() < len {
        bytes.extend_from_slice(&Sha256::digest(
            [n.to_le_bytes(), block.to_le_bytes()].concat(),
        ));
        block += 1;
    }
    bytes.truncate(len);
    bytes
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
