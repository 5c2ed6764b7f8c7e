//! The source and destination migration sessions ([`ferry_proto::source`],
//! [`ferry_proto::dest`]) driven against each other in memory, on
//! simulated time: a control connection in each direction (frames hashed
//! into each side's transcripts as they cross), data channels that carry
//! pages into the destination's memory (its ledger and the migration's
//! round gate), and faults on the way: loss, delay, reordering across
//! channels, a channel dying, a silent peer, a corrupted or forged message,
//! a failed restore. Each scenario runs until both sides are done and
//! checks what each concluded, and that the destination's memory is the
//! source's only when both say committed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_proto::control::{AuditReport, AuditResult, Msg};
use ferry_proto::dest::{self, ChannelEnd, ChannelOutcome, DestSession};
use ferry_proto::evidence::Ledger;
use ferry_proto::frame::RoundGate;
use ferry_proto::session::SessionError;
use ferry_proto::source::{self, SourceSession};
use ferry_proto::switchover::{Claims, Transcripts};
use ferry_proto::SessionKeys;
use sha2::{Digest, Sha256};

const PAGE: u64 = 4096;
const PAGES: u64 = 16;
const TIMEOUT: Duration = Duration::from_secs(5);
const LATENCY: Duration = Duration::from_millis(2);

fn keys() -> SessionKeys {
    SessionKeys::derive(&[7; 32], &[1; 32], &[2; 32])
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 4000 + i as u16))
}

/// A page of guest memory: `fill` in every byte but the first, which
/// holds the page's number (no two pages alike).
fn page(n: u64, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; PAGE as usize];
    p[0] = n as u8;
    p
}

/// A data frame: one page of one round.
#[derive(Debug, Clone)]
struct Frame {
    round: u32,
    gpa: u64,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Event {
    ToDest(Msg),
    ToSource(Msg),
    Data(usize, Frame),
    /// A copy of a frame the source no longer tracks (a replay, or a copy
    /// held back in the network): it does not hold up the round's flush.
    Late(usize, Frame),
    /// The destination's receiver of channel `i` sees its connection fail.
    ChannelFailed(usize),
}

/// The name of the message to change, and the change.
type Tamper = (&'static str, fn(&mut Msg));

/// What goes wrong on the way.
#[derive(Default, Clone)]
struct Faults {
    /// Drop the source's first message of this name.
    drop_s2d: Option<&'static str>,
    /// Drop the destination's first message of this name.
    drop_d2s: Option<&'static str>,
    /// Change the destination's first message of this name.
    tamper_d2s: Option<Tamper>,
    /// Change the source's first message of this name.
    tamper_s2d: Option<Tamper>,
    /// The destination goes silent (answers nothing, receives nothing)
    /// once it has received a message of this name.
    dest_silent_after: Option<&'static str>,
    /// The source goes silent (sends nothing more) before this step.
    source_silent_at: Option<&'static str>,
    /// Channel `.0` dies in round `.1` after carrying `.2` frames: the
    /// source fails its pages over to the others; what it carried stays in
    /// the network, delivered `.3` later (stale bytes).
    kill: Option<(usize, u32, usize, Duration)>,
    /// Its receiver on the destination also sees it fail, `.0` later.
    kill_seen: Option<Duration>,
    /// Extra delay on channel `.0`.
    slow: Option<(usize, Duration)>,
    /// A frame of round `.0` for page `.1` is also delivered again on
    /// channel `.2`, `.3` later (a duplicate or a reordered stale copy).
    replay: Option<(u32, u64, usize, Duration)>,
    /// The destination's restore hook fails.
    restore_fails: bool,
    /// Page `.0` lands with its byte `.1` flipped.
    corrupt_landing: Option<(u64, usize)>,
    /// The source reports the wrong device state in its claims.
    source_claims_other_state: bool,
    /// The guest writes its pages after round 0 only (not after every
    /// round).
    write_once: bool,
}

/// The source: guest memory, its ledger, the session and a driver that
/// does what the engine does.
struct Source {
    s: SourceSession,
    mem: BTreeMap<u64, Vec<u8>>,
    ledger: Ledger,
    dirty: BTreeSet<u64>,
    sent: Sha256,
    heard: Sha256,
    channels: usize,
    dead: BTreeSet<usize>,
    /// Pre-copy rounds before the pause.
    rounds: u32,
    /// Pages the guest writes after each pre-copy round.
    writes: Vec<u64>,
    next: usize,
    device_state: Vec<u8>,
    device_hash: [u8; 32],
    transcripts: Option<Transcripts>,
    paused: bool,
    resumed_here: bool,
    result: Option<Result<(), SessionError>>,
    round_trips: Vec<Duration>,
    fenced: usize,
}

/// The destination: its memory, ledger, round gate and session.
struct Dest {
    d: DestSession,
    mem: BTreeMap<u64, Vec<u8>>,
    ledger: Ledger,
    gate: RoundGate,
    sent: Sha256,
    heard: Sha256,
    open: BTreeSet<usize>,
    progress: u64,
    stale_refused: u64,
    fenced_dropped: u64,
    restored: bool,
    resumed: bool,
    audit: Option<Option<AuditReport>>,
    result: Option<Result<(), SessionError>>,
    silent: bool,
}

struct Sim {
    now: Instant,
    seq: u64,
    events: BTreeMap<(Instant, u64), Event>,
    src: Source,
    dst: Dest,
    f: Faults,
    log: Vec<String>,
}

/// Records in `ledger` that page `gpa` holds `bytes`.
fn note(ledger: &Ledger, gpa: u64, bytes: &[u8]) {
    let delta = ledger.record(gpa, ledger.key().hash(bytes)).unwrap();
    ledger.apply(delta);
}

/// What the network does to a control message on its way: drops it or
/// changes it (once each). The sender's transcript holds what it sent.
fn on_the_way(
    drop: &mut Option<&'static str>,
    tamper: &mut Option<Tamper>,
    log: &mut Vec<String>,
    mut m: Msg,
) -> Option<Msg> {
    if *drop == Some(m.name()) {
        *drop = None;
        log.push(format!("dropped {}", m.name()));
        return None;
    }
    if let Some((name, edit)) = *tamper {
        if name == m.name() {
            *tamper = None;
            edit(&mut m);
        }
    }
    Some(m)
}

fn frame_bytes(m: &Msg) -> Vec<u8> {
    m.encode()
}

impl Sim {
    fn new(channels: usize, rounds: u32, writes: Vec<u64>, f: Faults) -> Self {
        let k = keys();
        let now = Instant::now();
        let regions = [(0u64, PAGES * PAGE)];
        let mem: BTreeMap<u64, Vec<u8>> = (0..PAGES).map(|n| (n * PAGE, page(n, 0x10))).collect();
        let mut sim = Sim {
            now,
            seq: 0,
            events: BTreeMap::new(),
            src: Source {
                s: SourceSession::new(k.commit.clone(), TIMEOUT),
                mem,
                ledger: Ledger::new(k.page.clone(), &regions).unwrap(),
                dirty: (0..PAGES).map(|n| n * PAGE).collect(),
                sent: Sha256::new(),
                heard: Sha256::new(),
                channels,
                dead: BTreeSet::new(),
                rounds,
                writes,
                next: 0,
                device_state: b"vcpu registers".to_vec(),
                device_hash: [0; 32],
                transcripts: None,
                paused: false,
                resumed_here: false,
                result: None,
                round_trips: Vec::new(),
                fenced: 0,
            },
            dst: Dest {
                d: DestSession::new(k.commit.clone(), TIMEOUT, now),
                mem: (0..PAGES)
                    .map(|n| (n * PAGE, vec![0; PAGE as usize]))
                    .collect(),
                ledger: Ledger::new(k.page.clone(), &regions).unwrap(),
                gate: RoundGate::new(),
                sent: Sha256::new(),
                heard: Sha256::new(),
                open: BTreeSet::new(),
                progress: 0,
                stale_refused: 0,
                fenced_dropped: 0,
                restored: false,
                resumed: false,
                audit: None,
                result: None,
                silent: false,
            },
            f,
            log: Vec::new(),
        };
        // The zero pages of round 0 are not skipped here: every page is
        // sent in round 0.
        for i in 0..channels {
            assert!(sim.dst.d.channel_opened(addr(i)));
            sim.dst.open.insert(i);
        }
        sim
    }

    fn at(&mut self, delay: Duration, e: Event) {
        self.seq += 1;
        self.events.insert((self.now + delay, self.seq), e);
    }

    // ---- the source's driver -------------------------------------------

    fn src_send(&mut self, m: Msg) {
        if self.src.result.is_some() && !matches!(m, Msg::Abort { .. }) {
            return;
        }
        if self.f.source_silent_at == Some(m.name()) {
            self.f.source_silent_at = Some("*");
        }
        if self.f.source_silent_at == Some("*") {
            return;
        }
        if let Msg::Abort { .. } = m {
            self.log.push("source sent Abort".into());
        }
        self.src.sent.update(frame_bytes(&m));
        if let Some(m) = on_the_way(
            &mut self.f.drop_s2d,
            &mut self.f.tamper_s2d,
            &mut self.log,
            m,
        ) {
            self.at(LATENCY, Event::ToDest(m));
        }
    }

    fn src_fail(&mut self, e: SessionError) {
        if self.src.result.is_some() {
            return;
        }
        self.log.push(format!("source: {e}"));
        if let Some(abort) = self.src.s.abort(&e.to_string()) {
            self.src_send(abort);
        }
        if self.src.s.guest_is_ours() && self.src.paused {
            self.src.resumed_here = true;
        }
        self.src.result = Some(Err(e));
    }

    fn src_try<T>(&mut self, r: Result<T, SessionError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.src_fail(e);
                None
            }
        }
    }

    /// Sends the dirty pages of the current round over the live channels
    /// (round robin), recording what was sent in the ledger; a channel
    /// that dies fails its pages over to the others.
    fn src_send_round(&mut self) {
        let round = self.src.s.round();
        let pages: Vec<u64> = std::mem::take(&mut self.src.dirty).into_iter().collect();
        let mut carried = vec![0usize; self.src.channels];
        let mut queue: std::collections::VecDeque<u64> = pages.into();
        if let Some((ch, r, 0, _)) = self.f.kill {
            if r == round {
                // Dead before it carries anything of this round.
                self.src.dead.insert(ch);
                self.f.kill = None;
                if let Some(seen) = self.f.kill_seen {
                    self.at(seen, Event::ChannelFailed(ch));
                }
            }
        }
        while let Some(gpa) = queue.pop_front() {
            let live: Vec<usize> = (0..self.src.channels)
                .filter(|c| !self.src.dead.contains(c))
                .collect();
            if live.is_empty() {
                // Every channel lost: the engine's transport fails.
                self.src_fail(SessionError::PeerAborted("no data channel left".into()));
                return;
            }
            let c = live[self.src.next % live.len()];
            self.src.next += 1;
            let bytes = self.src.mem[&gpa].clone();
            note(&self.src.ledger, gpa, &bytes);
            let fr = Frame { round, gpa, bytes };
            let mut delay = LATENCY;
            if let Some((ch, extra)) = self.f.slow {
                if ch == c {
                    delay += extra;
                }
            }
            if let Some((ch, r, n, stale)) = self.f.kill {
                if ch == c && r == round && carried[c] >= n {
                    // Dead: this frame and the rest go over the others;
                    // what it carried so far may still arrive, late.
                    self.src.dead.insert(c);
                    self.f.kill = None;
                    let late: Vec<(Instant, u64)> = self
                        .events
                        .iter()
                        .filter(|(_, e)| matches!(e, Event::Data(i, _) if *i == c))
                        .map(|(k, _)| *k)
                        .collect();
                    for k in late {
                        let e = self.events.remove(&k).unwrap();
                        self.seq += 1;
                        self.events.insert((k.0 + stale, self.seq), e);
                    }
                    if let Some(seen) = self.f.kill_seen {
                        self.at(seen, Event::ChannelFailed(c));
                    }
                    queue.push_front(gpa);
                    continue;
                }
            }
            carried[c] += 1;
            if let Some((r, g, ch, later)) = self.f.replay {
                if r == round && g == gpa {
                    self.at(delay + later, Event::Late(ch, fr.clone()));
                }
            }
            self.at(delay, Event::Data(c, fr));
        }
    }

    /// Every frame of the round was delivered (acknowledged): the engine's
    /// flush returns; lost channels are fenced.
    fn src_flushed(&mut self) {
        let lost: Vec<SocketAddr> = self.src.dead.iter().map(|c| addr(*c)).collect();
        // A channel is reported lost once.
        let lost: Vec<SocketAddr> = lost.into_iter().skip(self.src.fenced).collect();
        self.src.fenced += lost.len();
        let now = self.now;
        let r = self.src.s.round_flushed(lost, now);
        match self.src_try(r) {
            Some(Some(fence)) => self.src_send(fence),
            Some(None) => self.src_after_fence(),
            None => {}
        }
    }

    fn src_after_fence(&mut self) {
        if self.src.paused {
            let (state, verify) = (self.src.device_state.clone(), false);
            let now = self.now;
            let r = self.src.s.switchover(state, verify, now);
            if let Some(m) = self.src_try(r) {
                self.src.device_hash = self.src.s.device_state_hash().unwrap();
                self.src_send(m);
                self.src.transcripts = Some(Transcripts {
                    s2d: self.src.sent.clone().finalize().into(),
                    d2s: self.src.heard.clone().finalize().into(),
                });
            }
            return;
        }
        let pages = PAGES;
        let r = self.src.s.round_done(pages);
        if let Some(m) = self.src_try(r) {
            self.src_send(m);
            let now = self.now;
            let r = self.src.s.ping(now);
            if let Some(m) = self.src_try(r) {
                self.src_send(m);
            }
        }
    }

    fn src_handle(&mut self, m: Msg) {
        if self.src.result.is_some() && !self.src.s.is_committed() {
            return;
        }
        self.src.heard.update(frame_bytes(&m));
        let now = self.now;
        let r = self.src.s.handle(m, now);
        let Some(step) = self.src_try(r) else { return };
        match step {
            source::Step::Fenced => self.src_after_fence(),
            source::Step::RoundTrip(rtt) => {
                self.src.round_trips.push(rtt);
                if self.src.s.round() < self.src.rounds {
                    // The guest wrote between rounds.
                    let writes = if self.f.write_once && self.src.s.round() > 1 {
                        vec![]
                    } else {
                        self.src.writes.clone()
                    };
                    for &g in &writes {
                        let n = g / PAGE;
                        let fill = 0x20 + self.src.s.round() as u8;
                        self.src.mem.insert(g, page(n, fill));
                        self.src.dirty.insert(g);
                    }
                    let r = self.src.s.next_round();
                    if self.src_try(r).is_some() {
                        self.src_send_round();
                    }
                } else {
                    let r = self.src.s.pause();
                    if self.src_try(r).is_some() {
                        self.src.paused = true;
                        self.src_send_round();
                    }
                }
            }
            source::Step::Ready => {
                let mut device_state = self.src.device_hash;
                if self.f.source_claims_other_state {
                    device_state[0] ^= 1;
                }
                let claims = Claims {
                    transcripts: self.src.transcripts.unwrap(),
                    evidence: self.src.ledger.evidence(),
                    device_state,
                    memory: None,
                };
                let r = self.src.s.verify_ready(&claims);
                if self.src_try(r).is_some() {
                    let r = self.src.s.commit(now);
                    if let Some(m) = self.src_try(r) {
                        self.src_send(m);
                    }
                }
            }
            source::Step::Committed(_) => {
                let report = AuditReport {
                    result: AuditResult::Passed,
                    pages: PAGES,
                    mismatched_pages: 0,
                    first_mismatch: None,
                    duration_us: 1,
                    pause_predicted: Default::default(),
                    pause_actual: Default::default(),
                    mac: [0; 32],
                };
                let r = self.src.s.audit(report);
                if let Some(m) = self.src_try(r) {
                    self.src_send(m);
                }
                self.src.result = Some(Ok(()));
            }
        }
    }

    // ---- the destination's driver --------------------------------------

    fn dst_send(&mut self, m: Msg) {
        if self.dst.silent {
            return;
        }
        self.dst.sent.update(frame_bytes(&m));
        if let Some(m) = on_the_way(
            &mut self.f.drop_d2s,
            &mut self.f.tamper_d2s,
            &mut self.log,
            m,
        ) {
            self.at(LATENCY, Event::ToSource(m));
        }
    }

    fn dst_fail(&mut self, e: SessionError) {
        if self.dst.result.is_some() {
            return;
        }
        self.log.push(format!("destination: {e}"));
        if let Some(m) = self.dst.d.abort(&e.to_string()) {
            self.dst_send(m);
        }
        self.dst.open.clear();
        self.dst.result = Some(Err(e));
    }

    fn dst_handle(&mut self, m: Msg) {
        if self.dst.silent || self.dst.result.is_some() {
            return;
        }
        if self.f.dest_silent_after == Some(m.name()) {
            self.dst.silent = true;
        }
        self.dst.heard.update(frame_bytes(&m));
        if self.dst.silent {
            return;
        }
        let now = self.now;
        let step = match self.dst.d.handle(m, now) {
            Ok(s) => s,
            Err(e) => return self.dst_fail(e),
        };
        match step {
            dest::Step::RoundDone { .. } => {}
            dest::Step::Send(m) => self.dst_send(m),
            dest::Step::Fence { close, reply, .. } => {
                for p in close {
                    let c = (0..self.src.channels).find(|c| addr(*c) == p).unwrap();
                    self.dst.open.remove(&c);
                    if let ChannelEnd::Send(m) =
                        self.dst.d.channel_ended(Some(p), ChannelOutcome::Closed)
                    {
                        self.dst_send(m);
                    }
                }
                if let Some(m) = reply {
                    self.dst_send(m);
                }
            }
            dest::Step::Switchover => {
                // Every channel stopped: nothing more lands.
                self.dst.open.clear();
                let claims = Claims {
                    transcripts: Transcripts {
                        s2d: self.dst.heard.clone().finalize().into(),
                        d2s: self.dst.sent.clone().finalize().into(),
                    },
                    evidence: self.dst.ledger.evidence(),
                    device_state: self.dst.d.switchover().unwrap().device_state_hash,
                    memory: None,
                };
                match self.dst.d.ready(claims, now) {
                    Ok(m) => self.dst_send(m),
                    Err(e) => self.dst_fail(e),
                }
            }
            dest::Step::Restore => {
                if self.f.restore_fails {
                    let why = "device-state restore failed: no such device";
                    match self.dst.d.restore_failed(why) {
                        Ok(m) => self.dst_send(m),
                        Err(e) => return self.dst_fail(e),
                    }
                    self.dst.result = Some(Err(SessionError::CommitRefused(why.into())));
                    return;
                }
                self.dst.restored = true;
                match self.dst.d.restored(now) {
                    Ok((m, _pause)) => {
                        self.dst_send(m);
                        self.dst.resumed = true;
                    }
                    Err(e) => self.dst_fail(e),
                }
            }
            dest::Step::Audit(a) => {
                self.dst.audit = Some(a);
                self.dst.result = Some(Ok(()));
            }
        }
    }

    fn dst_land(&mut self, c: usize, fr: Frame) {
        if self.dst.result.is_some() || self.dst.silent {
            return;
        }
        if !self.dst.open.contains(&c) {
            // Closed (fenced or stopped): its bytes never land.
            self.dst.fenced_dropped += 1;
            return;
        }
        if self.dst.gate.admit(fr.round).is_err() {
            self.dst.stale_refused += 1;
            return;
        }
        let mut bytes = fr.bytes;
        if let Some((g, b)) = self.f.corrupt_landing {
            if g == fr.gpa {
                bytes[b] ^= 0xff;
                self.f.corrupt_landing = None;
            }
        }
        note(&self.dst.ledger, fr.gpa, &bytes);
        self.dst.mem.insert(fr.gpa, bytes);
        self.dst.progress += 1;
    }

    fn dst_channel_failed(&mut self, c: usize) {
        if self.dst.result.is_some() || !self.dst.open.remove(&c) {
            return;
        }
        match self
            .dst
            .d
            .channel_ended(Some(addr(c)), ChannelOutcome::Failed)
        {
            ChannelEnd::NoneLeft => self.dst_fail(SessionError::PeerAborted(
                "every data channel failed".into(),
            )),
            ChannelEnd::Send(m) => self.dst_send(m),
            ChannelEnd::CarryOn => {}
        }
    }

    // ---- the network and the clock ---------------------------------------

    /// True while data frames of live channels are still in flight (the
    /// round's flush has not returned).
    fn in_flight(&self) -> bool {
        self.events.values().any(|e| match e {
            Event::Data(c, _) => !self.src.dead.contains(c),
            _ => false,
        })
    }

    fn done(&self) -> bool {
        self.src.result.is_some() && self.dst.result.is_some()
    }

    /// Runs until both sides are done or `limit` simulated time passed.
    fn run(&mut self, limit: Duration) {
        let start = self.now;
        self.src_send_round();
        let mut flushing = true;
        while !self.done() && self.now - start < limit {
            if flushing && self.src.result.is_none() && !self.in_flight() {
                flushing = false;
                self.src_flushed();
            }
            let tick = self.now + Duration::from_millis(250);
            let next = self.events.keys().next().copied();
            match next {
                Some(k) if k.0 <= tick => {
                    let e = self.events.remove(&k).unwrap();
                    self.now = self.now.max(k.0);
                    let round = self.src.s.round();
                    let paused = self.src.paused;
                    match e {
                        Event::ToDest(m) => self.dst_handle(m),
                        Event::ToSource(m) => self.src_handle(m),
                        Event::Data(c, fr) | Event::Late(c, fr) => self.dst_land(c, fr),
                        Event::ChannelFailed(c) => self.dst_channel_failed(c),
                    }
                    // A new round (or the final copy) began: flush it next.
                    if self.src.s.round() != round || self.src.paused != paused {
                        flushing = true;
                    }
                }
                _ => {
                    self.now = tick;
                    let now = self.now;
                    if self.src.result.is_none() {
                        if let Err(e) = self.src.s.handle_timeout(now) {
                            self.src_fail(e);
                        }
                    }
                    if self.dst.result.is_none() && !self.dst.silent {
                        let progress = self.dst.progress;
                        if let Err(e) = self.dst.d.tick(now, progress) {
                            self.dst_fail(e);
                        }
                        // An audit that never comes ends the session quietly.
                        if self.dst.d.is_committed() && self.dst.d.poll_timeout().is_none() {
                            self.dst.audit = Some(None);
                            self.dst.result = Some(Ok(()));
                        }
                    }
                    if self.dst.silent && self.dst.result.is_none() {
                        // A silent destination never concludes by itself.
                        if self.src.result.is_some() {
                            self.dst.result = Some(Err(SessionError::Timeout {
                                what: "silent",
                                after: Duration::ZERO,
                            }));
                        }
                    }
                }
            }
        }
    }

    fn memory_equal(&self) -> bool {
        self.src.mem == self.dst.mem
    }
}

fn committed(sim: &Sim) {
    assert!(
        matches!(sim.src.result, Some(Ok(()))),
        "source: {:?}\n{:#?}",
        sim.src.result,
        sim.log
    );
    assert!(
        matches!(sim.dst.result, Some(Ok(()))),
        "destination: {:?}\n{:#?}",
        sim.dst.result,
        sim.log
    );
    assert!(sim.src.s.is_committed() && sim.dst.d.is_committed());
    assert!(!sim.src.s.guest_is_ours());
    assert!(sim.dst.resumed);
    assert!(
        sim.memory_equal(),
        "the destination holds the source's memory"
    );
    assert!(
        matches!(sim.dst.audit, Some(Some(_))),
        "the audit arrived with its proof"
    );
}

/// Neither side committed: the guest is the source's and runs there.
fn aborted(sim: &Sim) -> (&SessionError, &SessionError) {
    let s = match &sim.src.result {
        Some(Err(e)) => e,
        other => panic!("source: {other:?}\n{:#?}", sim.log),
    };
    let d = match &sim.dst.result {
        Some(Err(e)) => e,
        other => panic!("destination: {other:?}\n{:#?}", sim.log),
    };
    assert!(sim.src.s.guest_is_ours(), "the guest stays the source's");
    assert!(!sim.dst.resumed, "the destination never runs it");
    (s, d)
}

/// One channel, one pre-copy round after round 0, the guest idle: the
/// shortest migration that reaches every step of the switchover.
fn short(f: Faults) -> Sim {
    run(1, 2, vec![], f)
}

fn run(channels: usize, rounds: u32, writes: Vec<u64>, f: Faults) -> Sim {
    let mut sim = Sim::new(channels, rounds, writes, f);
    sim.run(Duration::from_secs(60));
    assert!(sim.done(), "both sides concluded: {:#?}", sim.log);
    sim
}

// ---- scenarios ------------------------------------------------------------

#[test]
fn a_clean_migration_commits_with_equal_memory() {
    let sim = run(1, 3, vec![3 * PAGE, 7 * PAGE], Faults::default());
    committed(&sim);
    assert_eq!(
        sim.src.round_trips.len(),
        3,
        "one round trip per pre-copy round"
    );
    assert!(sim.src.round_trips.iter().all(|r| *r == 2 * LATENCY));
}

#[test]
fn four_channels_and_many_rounds_commit() {
    let sim = run(4, 6, vec![0, PAGE, 9 * PAGE, 15 * PAGE], Faults::default());
    committed(&sim);
    assert_eq!(sim.dst.d.channels().0, 4);
}

#[test]
fn a_migration_with_no_precopy_round_left_still_commits() {
    // Round 0 only, then the final copy.
    let sim = run(2, 1, vec![], Faults::default());
    committed(&sim);
}

#[test]
fn a_lost_fenced_answer_times_the_source_out_and_resumes_its_guest() {
    let sim = run(
        2,
        3,
        vec![PAGE],
        Faults {
            kill: Some((1, 1, 0, Duration::ZERO)),
            drop_d2s: Some("Fenced"),
            ..Default::default()
        },
    );
    let (s, d) = aborted(&sim);
    assert!(
        matches!(
            s,
            SessionError::Timeout {
                what: "the destination's Fenced",
                ..
            }
        ),
        "{s}"
    );
    assert!(matches!(d, SessionError::PeerAborted(_)), "{d}");
}

#[test]
fn a_lost_pong_times_out_and_the_destination_hears_why() {
    let sim = run(
        1,
        3,
        vec![],
        Faults {
            drop_d2s: Some("Pong"),
            ..Default::default()
        },
    );
    let (s, d) = aborted(&sim);
    assert_eq!(
        *s,
        SessionError::Timeout {
            what: "the destination's Pong",
            after: TIMEOUT
        }
    );
    match d {
        SessionError::PeerAborted(why) => assert!(why.contains("Pong"), "{why}"),
        e => panic!("{e}"),
    }
}

#[test]
fn a_lost_round_done_changes_the_transcripts_and_nothing_commits() {
    // The destination never heard one RoundDone: the source's transcript
    // holds it, the destination's does not; Ready cannot verify.
    let sim = run(
        1,
        3,
        vec![2 * PAGE],
        Faults {
            drop_s2d: Some("RoundDone"),
            ..Default::default()
        },
    );
    let (s, _) = aborted(&sim);
    assert_eq!(
        *s,
        SessionError::Verification(ferry_proto::switchover::Mismatch::Transcript)
    );
}

#[test]
fn a_lost_ready_times_out_before_commit_and_the_guest_resumes_here() {
    let sim = short(Faults {
        drop_d2s: Some("Ready"),
        ..Default::default()
    });
    let (s, d) = aborted(&sim);
    assert!(
        matches!(
            s,
            SessionError::Timeout {
                what: "the destination's Ready",
                ..
            }
        ),
        "{s}"
    );
    assert!(
        sim.src.resumed_here,
        "the paused guest resumes on the source"
    );
    // The destination heard the abort, or gave up on Commit first.
    assert!(
        matches!(
            d,
            SessionError::PeerAborted(_) | SessionError::Timeout { what: "Commit", .. }
        ),
        "{d}"
    );
}

#[test]
fn a_lost_commit_times_the_destination_out_and_leaves_the_source_paused() {
    let sim = short(Faults {
        drop_s2d: Some("Commit"),
        ..Default::default()
    });
    // The destination gives up on Commit; the source, having sent it,
    // cannot know the destination did not run the guest.
    match &sim.dst.result {
        Some(Err(SessionError::Timeout { what: "Commit", .. })) => {}
        other => panic!("{other:?}"),
    }
    match &sim.src.result {
        Some(Err(SessionError::CommitUnconfirmed(why))) => {
            assert!(why.contains("Committed"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!sim.src.s.guest_is_ours(), "left paused, not resumed");
    assert!(!sim.src.resumed_here);
    assert!(
        !sim.log.iter().any(|l| l == "source sent Abort"),
        "after Commit the source takes nothing back: {:?}",
        sim.log
    );
    assert!(!sim.dst.resumed);
}

#[test]
fn a_lost_committed_leaves_the_source_paused_while_the_destination_runs() {
    let sim = short(Faults {
        drop_d2s: Some("Committed"),
        ..Default::default()
    });
    assert!(
        sim.dst.resumed,
        "the destination committed and runs the guest"
    );
    assert!(matches!(
        sim.src.result,
        Some(Err(SessionError::CommitUnconfirmed(_)))
    ));
    assert!(!sim.src.s.guest_is_ours(), "never two running copies");
}

#[test]
fn a_fenced_for_other_channels_is_not_the_answer() {
    let sim = run(
        2,
        3,
        vec![PAGE, 2 * PAGE],
        Faults {
            kill: Some((1, 1, 0, Duration::ZERO)),
            tamper_d2s: Some(("Fenced", |m| {
                if let Msg::Fenced { channels } = m {
                    channels.clear();
                }
            })),
            ..Default::default()
        },
    );
    let (s, _) = aborted(&sim);
    assert_eq!(
        *s,
        SessionError::Unexpected {
            expected: "Fenced",
            got: "Fenced"
        }
    );
}

#[test]
fn delay_below_the_timeout_changes_nothing() {
    let sim = run(
        3,
        4,
        vec![5 * PAGE],
        Faults {
            slow: Some((2, Duration::from_secs(3))),
            ..Default::default()
        },
    );
    committed(&sim);
}

#[test]
fn a_dead_channel_is_fenced_and_its_stale_bytes_never_land() {
    // Channel 1 dies in round 2 after one frame: its pages go over the
    // others; a late copy of what it carried arrives after the fence.
    let sim = run(
        2,
        4,
        vec![PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE],
        Faults {
            kill: Some((1, 2, 1, Duration::from_millis(10))),
            ..Default::default()
        },
    );
    committed(&sim);
    assert!(
        sim.dst.fenced_dropped > 0,
        "the stale copy came and was dropped"
    );
}

#[test]
fn a_channel_whose_receiver_also_fails_is_fenced_without_waiting() {
    let sim = run(
        3,
        3,
        vec![PAGE, 6 * PAGE],
        Faults {
            kill: Some((0, 1, 0, Duration::ZERO)),
            kill_seen: Some(Duration::from_millis(1)),
            ..Default::default()
        },
    );
    committed(&sim);
}

#[test]
fn a_stale_frame_reordered_behind_a_newer_round_is_refused_by_the_gate() {
    // Round 0's copy of page 4 arrives again on channel 0 after round 1
    // carried the page's newer content, and nothing later rewrites it: the
    // round gate refuses it. (Admitted, it would overwrite the newer copy:
    // the memories would differ and the evidence would refuse the commit.)
    let sim = run(
        2,
        4,
        vec![4 * PAGE, 5 * PAGE],
        Faults {
            replay: Some((0, 4 * PAGE, 0, Duration::from_millis(9))),
            write_once: true,
            ..Default::default()
        },
    );
    committed(&sim);
    assert_eq!(sim.dst.stale_refused, 1);
}

#[test]
fn a_duplicate_frame_within_its_round_is_harmless() {
    let sim = run(
        2,
        3,
        vec![4 * PAGE],
        Faults {
            replay: Some((2, 4 * PAGE, 1, Duration::ZERO)),
            ..Default::default()
        },
    );
    committed(&sim);
}

#[test]
fn a_page_corrupted_on_landing_fails_the_evidence_and_nothing_commits() {
    let sim = run(
        2,
        2,
        vec![],
        Faults {
            corrupt_landing: Some((5 * PAGE, 100)),
            ..Default::default()
        },
    );
    let (s, d) = aborted(&sim);
    assert_eq!(
        *s,
        SessionError::Verification(ferry_proto::switchover::Mismatch::Evidence)
    );
    assert!(matches!(d, SessionError::PeerAborted(_)));
    assert!(sim.src.resumed_here);
}

#[test]
fn a_silent_destination_times_the_source_out() {
    let sim = run(
        1,
        3,
        vec![],
        Faults {
            dest_silent_after: Some("RoundDone"),
            ..Default::default()
        },
    );
    match &sim.src.result {
        Some(Err(SessionError::Timeout { what, after })) => {
            assert_eq!(*what, "the destination's Pong");
            assert_eq!(*after, TIMEOUT);
        }
        other => panic!("{other:?}"),
    }
    assert!(sim.src.s.guest_is_ours());
}

#[test]
fn a_source_that_goes_silent_between_rounds_times_the_destination_out() {
    let sim = run(
        1,
        3,
        vec![],
        Faults {
            source_silent_at: Some("Ping"),
            ..Default::default()
        },
    );
    match &sim.dst.result {
        Some(Err(SessionError::Timeout { what, .. })) => {
            assert_eq!(*what, "pages or messages from the source")
        }
        other => panic!("{other:?}\n{:#?}", sim.log),
    }
    assert!(!sim.dst.resumed);
}

#[test]
fn a_forged_commit_is_refused_with_proof_and_the_source_resumes() {
    let sim = short(Faults {
        tamper_s2d: Some(("Commit", |m| {
            if let Msg::Commit { mac } = m {
                mac[0] ^= 1;
            }
        })),
        ..Default::default()
    });
    match &sim.dst.result {
        Some(Err(SessionError::CommitProof)) => {}
        other => panic!("{other:?}"),
    }
    // The refusal is bound to the Commit the source did send: it proves
    // the destination will not run the guest.
    match &sim.src.result {
        Some(Err(SessionError::CommitRefused(why))) => {
            assert!(why.contains("does not prove"), "{why}")
        }
        other => panic!("{other:?}\n{:#?}", sim.log),
    }
    assert!(sim.src.s.guest_is_ours());
    assert!(sim.src.resumed_here);
    assert!(!sim.dst.resumed);
}

#[test]
fn a_forged_committed_is_not_believed() {
    let sim = short(Faults {
        tamper_d2s: Some(("Committed", |m| {
            if let Msg::Committed { mac } = m {
                mac[31] ^= 1;
            }
        })),
        ..Default::default()
    });
    match &sim.src.result {
        Some(Err(SessionError::CommitUnconfirmed(why))) => {
            assert!(why.contains("proof"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!sim.src.s.guest_is_ours(), "stays paused: it may run there");
}

#[test]
fn a_refusal_without_the_sessions_proof_does_not_give_the_guest_back() {
    let sim = short(Faults {
        restore_fails: true,
        tamper_d2s: Some(("CommitRefused", |m| {
            if let Msg::CommitRefused { mac, .. } = m {
                mac[0] ^= 1;
            }
        })),
        ..Default::default()
    });
    match &sim.src.result {
        Some(Err(SessionError::CommitUnconfirmed(why))) => {
            assert!(why.contains("refusal without"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert!(!sim.src.s.guest_is_ours());
}

#[test]
fn a_failed_restore_is_refused_with_proof_and_the_source_resumes() {
    let sim = run(
        2,
        2,
        vec![PAGE],
        Faults {
            restore_fails: true,
            ..Default::default()
        },
    );
    match &sim.src.result {
        Some(Err(SessionError::CommitRefused(why))) => assert!(why.contains("no such device")),
        other => panic!("{other:?}"),
    }
    assert!(sim.src.s.guest_is_ours() && sim.src.resumed_here);
    assert!(!sim.dst.resumed);
}

#[test]
fn a_forged_ready_fails_verification_before_commit() {
    let sim = short(Faults {
        tamper_d2s: Some(("Ready", |m| {
            if let Msg::Ready(r) = m {
                r.evidence[0] ^= 1;
            }
        })),
        ..Default::default()
    });
    let (s, _) = aborted(&sim);
    // The Ready's bytes changed: so did the transcript the source holds.
    assert!(matches!(s, SessionError::Verification(_)), "{s}");
}

#[test]
fn a_device_state_the_source_did_not_send_is_named() {
    let sim = short(Faults {
        source_claims_other_state: true,
        ..Default::default()
    });
    let (s, _) = aborted(&sim);
    assert_eq!(
        *s,
        SessionError::Verification(ferry_proto::switchover::Mismatch::DeviceState)
    );
}

#[test]
fn a_device_state_corrupted_on_the_way_is_refused_by_the_destination() {
    let sim = short(Faults {
        tamper_s2d: Some(("Switchover", |m| {
            if let Msg::Switchover(sw) = m {
                sw.device_state[0] ^= 1;
            }
        })),
        ..Default::default()
    });
    let (s, d) = aborted(&sim);
    assert_eq!(*d, SessionError::DeviceStateCorrupt);
    match s {
        SessionError::PeerAborted(why) => assert!(why.contains("device state"), "{why}"),
        e => panic!("{e}"),
    }
}

#[test]
fn every_channel_failing_at_the_destination_ends_the_migration() {
    let sim = run(
        1,
        3,
        vec![PAGE],
        Faults {
            kill: Some((0, 1, 0, Duration::ZERO)),
            kill_seen: Some(Duration::ZERO),
            ..Default::default()
        },
    );
    let (_, d) = aborted(&sim);
    assert!(matches!(d, SessionError::PeerAborted(_)), "{d}");
}

#[test]
fn a_fence_for_a_channel_the_destination_never_opened_is_answered_at_once() {
    let mut d = DestSession::new(keys().commit, TIMEOUT, Instant::now());
    let step = d
        .handle(
            Msg::Fence {
                channels: vec![addr(9)],
            },
            Instant::now(),
        )
        .unwrap();
    assert_eq!(
        step,
        dest::Step::Fence {
            channels: vec![addr(9)],
            close: vec![],
            reply: Some(Msg::Fenced {
                channels: vec![addr(9)]
            })
        }
    );
    // And the channel is refused if it arrives later.
    assert!(!d.channel_opened(addr(9)));
}

#[test]
fn arbitrary_event_sequences_never_panic_nor_break_the_commit_rules() {
    // What the `session` fuzz target runs, on pseudo-random inputs here
    // (the same on every run).
    for n in 0u32..2000 {
        let bytes = ferry_proto::session_fuzz::pseudo_random(n, (n % 400) as usize);
        ferry_proto::session_fuzz::fuzz_sessions(&bytes, Instant::now());
    }
}

#[test]
fn the_fuzz_driver_reaches_an_honest_commit() {
    // Events in the order an honest migration takes them (ops of
    // `fuzz_sessions`, each followed by its argument bytes): the fuzzer's
    // event language reaches the end of the protocol, so its invariants
    // are checked there too, not only on early refusals.
    let claims = [0, 1, 0]; // evidence 0, device-state hash [1; 32], no memory
    let mut ops: Vec<u8> = vec![
        0, 0, // round 0 flushed, no channel lost
        1, 5,  // RoundDone
        2,  // Ping
        18, // RoundDone to the destination
        18, // Ping to the destination: Pong back
        19, // Pong to the source: between rounds
        4,  // pause
        0, 0, // final copy flushed
        5, 1, 0,  // Switchover
        18, // to the destination: stop the channels
        12, // destination: Ready over its claims
    ];
    ops.extend_from_slice(&claims);
    ops.push(19); // Ready to the source
    ops.push(6); // the source checks it against the same claims
    ops.extend_from_slice(&claims);
    ops.extend_from_slice(&[
        7,  // Commit
        18, // to the destination: restore
        13, // restored: Committed
        19, // to the source
    ]);
    assert_eq!(
        ferry_proto::session_fuzz::fuzz_sessions(&ops, Instant::now()),
        (true, true)
    );
    // The same run with the source's claims one bit off never commits.
    let mut off = ops.clone();
    let at = off.len() - 4 - 3 + 1;
    off[at] ^= 1;
    assert_eq!(
        ferry_proto::session_fuzz::fuzz_sessions(&off, Instant::now()),
        (false, false)
    );
}
