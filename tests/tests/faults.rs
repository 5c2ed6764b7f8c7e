//! Fault injection: real `ferry listen` and `ferry send` processes with a
//! proxy between them (tests/src/proxy.rs) that kills processes, flips
//! bits, stalls and cuts connections at precise points of the protocol.
//!
//! Every case asserts that
//! * no data is lost: a committed migration has equal digests on both
//!   sides and every page of the synthetic guest verified on the
//!   destination; an aborted one leaves the guest running on the source,
//!   which says so and exits non-zero;
//! * the guest ends up running on exactly one side (the source's exit
//!   status and words, the destination's "committed" / "failed" line);
//! * the error names what went wrong.
//!
//! The destination listens on loopback and so advertises no interface: the
//! source's data channels follow the control connection, through the proxy.
//! The proxy reads frames, so both ends run with `--plaintext`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::{frame, MacKey};
use ferry_tests::proxy::{Dir, Frame, Kind, Proxy, Seen, Verdict};
use ferry_tests::{
    daemon, key_file, listen, rss_kib, rt, sigkill, start_send, summary, Output, Proc,
    KEEPS_RUNNING, KEY,
};
use ferry_transport::proto::{Msg, RejectReason, Role};
use ferry_transport::wire::{
    AckFrame, AckStatus, ChunkHeader, ChunkKind, FLAG_COMPRESSED, HEADER_LEN,
};

const LONG: Duration = Duration::from_secs(90);

struct Case {
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "key", KEY);
        Case { dir, key }
    }
    fn json(&self) -> PathBuf {
        self.dir.path().join("summary.json")
    }
    /// `ferry send --plaintext` through `proxy` with small-guest,
    /// short-timeout flags (tcp, 1 MiB chunks), `--force-switchover` and
    /// `extra`. These cases are about faults, not about whether the pause
    /// fits `--downtime-limit` on this host (three round trips through the
    /// proxy count in it: see `ferry_tests::migrate_ok`); a case about the
    /// policy's judgement of the pause uses [`Case::send_judged`].
    fn send(&self, proxy: &Proxy, extra: &[&str]) -> Proc {
        self.send_with(proxy, extra, true)
    }

    /// [`Case::send`] without `--force-switchover`: the policy may cancel.
    fn send_judged(&self, proxy: &Proxy, extra: &[&str]) -> Proc {
        self.send_with(proxy, extra, false)
    }

    fn send_with(&self, proxy: &Proxy, extra: &[&str], force: bool) -> Proc {
        let json = self.json();
        let mut defaults = vec![
            ("--plaintext", ""),
            ("--memory", "64MiB"),
            ("--performance-option", "tcp"),
            ("--chunk-size", "1MiB"),
            ("--peer-timeout", "10s"),
            ("--json", json.to_str().unwrap()),
        ];
        if force {
            defaults.push(("--force-switchover", ""));
        }
        let mut args: Vec<&str> = extra.to_vec();
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.push(flag);
                if !value.is_empty() {
                    args.push(value);
                }
            }
        }
        start_send(proxy.addr(), &self.key, &args)
    }
}

/// The source gave up and its guest runs on: exit 1, says so, names `why`.
fn assert_source_kept_guest(src: &Output, why: &[&str]) {
    assert!(!src.panicked(), "{}", src.all());
    assert_eq!(src.status.code(), Some(1), "{}", src.all());
    assert!(src.stderr.contains(KEEPS_RUNNING), "{}", src.all());
    assert!(!src.stdout.contains("migration committed"), "{}", src.all());
    assert!(
        why.iter().any(|w| src.stderr.contains(w)),
        "the source's error names one of {why:?}: {}",
        src.all()
    );
}

/// The destination refused to run the guest and says why.
fn assert_dest_failed(dest: &Output, why: &[&str]) {
    assert!(!dest.panicked(), "{}", dest.all());
    assert!(!dest.stdout.contains("committed"), "{}", dest.all());
    assert!(dest.stdout.contains("failed: "), "{}", dest.all());
    assert!(
        why.iter().any(|w| dest.stdout.contains(w)),
        "the destination's error names one of {why:?}: {}",
        dest.all()
    );
}

/// A destination that was killed: it never said it runs the guest.
fn assert_dest_killed(dest: &Output) {
    assert!(!dest.status.success(), "{}", dest.all());
    assert!(!dest.stdout.contains("committed"), "{}", dest.all());
}

/// Committed, with equal digests and every page verified on the destination.
fn assert_committed(src: &Output, dest_stdout: &str, json: &Path) -> serde_json::Value {
    assert!(src.status.success(), "source failed: {}", src.all());
    assert!(
        src.stdout.contains("verified on both sides"),
        "{}",
        src.all()
    );
    let s = summary(json);
    assert_eq!(s["digest_verified"], true);
    let digest = s["digest"].as_str().unwrap();
    assert!(
        dest_stdout.contains(&format!("digest {digest} verified")),
        "the destination has the same memory: {dest_stdout}"
    );
    assert!(
        dest_stdout.contains("pattern pages verified") && !dest_stdout.contains("corrupt pages"),
        "every page checked on the destination: {dest_stdout}"
    );
    s
}

fn is_data(f: &Frame) -> bool {
    f.role == Some(Role::Data)
}

fn page_chunks(seen: &[Seen]) -> usize {
    seen.iter()
        .filter(|s| matches!(s.kind, Kind::Chunk(_, ChunkKind::Pages)))
        .count()
}

fn saw_msg(seen: &[Seen], name: &str) -> bool {
    seen.iter()
        .any(|s| matches!(&s.kind, Kind::Control(m) if m.name() == name))
}

// ---------------------------------------------------------------------------
// Destination killed

/// Kills the destination when `when` says so (before forwarding that
/// frame), and runs a migration through the proxy.
fn kill_destination_when(
    send_extra: &[&str],
    when: impl Fn(&Frame) -> bool + Send + 'static,
) -> (Output, Output, Vec<Seen>) {
    let c = Case::new();
    let (dest, addr) = listen(&c.key, &["--plaintext", "--peer-timeout", "5s"]);
    let pid = dest.pid();
    let killed = AtomicBool::new(false);
    let proxy = Proxy::start(
        addr,
        Box::new(move |f| {
            if !killed.load(Ordering::SeqCst) && when(f) {
                killed.store(true, Ordering::SeqCst);
                sigkill(pid);
                return Verdict::Drop;
            }
            Verdict::Forward
        }),
    );
    let src = c.send(&proxy, send_extra).wait(LONG);
    let dest = dest.wait(LONG);
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|s| s.verdict == Verdict::Drop),
        "the fault was injected: {}",
        src.all()
    );
    (src, dest, seen)
}

#[test]
fn destination_killed_in_round_0() {
    let (src, dest, seen) = kill_destination_when(&["--dirty-rate", "8MB/s"], |f| {
        f.pages()
            .is_some_and(|h| h.round.get() == 0 && h.seq.get() >= 3)
    });
    assert!(!saw_msg(&seen, "RoundDone"), "still in round 0");
    assert_dest_killed(&dest);
    assert_source_kept_guest(&src, &["the destination closed the control connection"]);
}

#[test]
fn destination_killed_in_a_later_round() {
    // A busy guest that cannot meet a 1 ms pause: several rounds.
    let (src, dest, seen) = kill_destination_when(
        &[
            "--dirty-rate",
            "32MB/s",
            "--downtime-limit",
            "1ms",
            "--max-rounds",
            "6",
            "--force-switchover",
        ],
        |f| f.pages().is_some_and(|h| h.round.get() == 2),
    );
    assert!(saw_msg(&seen, "RoundDone"), "past round 0");
    assert!(!saw_msg(&seen, "Switchover"), "still in pre-copy");
    assert_dest_killed(&dest);
    assert_source_kept_guest(&src, &["the destination closed the control connection"]);
}

#[test]
fn destination_killed_between_ready_and_commit() {
    // The destination has verified its memory and answered Ready; it dies
    // before the source could commit: the source resumes its guest.
    let (src, dest, seen) = kill_destination_when(&["--dirty-rate", "8MB/s"], |f| {
        f.msg_name() == Some("Ready")
    });
    assert!(saw_msg(&seen, "Switchover"));
    assert!(!saw_msg(&seen, "Commit"), "Commit was never sent");
    assert_dest_killed(&dest);
    assert_source_kept_guest(
        &src,
        &["migration failed: peer closed the control connection"],
    );
}

#[test]
fn destination_killed_after_commit_was_sent_leaves_the_guest_paused() {
    // Commit sent but never confirmed: the guest may already run on the
    // destination, so the source must not resume it (two running copies
    // would be worse) and says so. Here the destination died before it
    // received Commit: the guest runs nowhere, and the operator is told.
    let (src, dest, _) = kill_destination_when(&["--dirty-rate", "8MB/s"], |f| {
        f.msg_name() == Some("Commit")
    });
    assert_dest_killed(&dest);
    assert!(!src.panicked(), "{}", src.all());
    // Exit status 4: the guest is left paused here.
    assert_eq!(src.status.code(), Some(4), "{}", src.all());
    assert!(
        src.stderr.contains(
            "commit was sent but the destination did not confirm it (peer closed the control connection"
        ),
        "{}",
        src.all()
    );
    assert!(
        src.stderr
            .contains("the guest is left paused on this host (running: false)"),
        "{}",
        src.all()
    );
    assert!(!src.stderr.contains(KEEPS_RUNNING), "{}", src.all());
}

// ---------------------------------------------------------------------------
// Source killed

#[test]
fn source_killed_mid_migration_frees_the_destination_for_the_next() {
    let c = Case::new();
    // One migration at a time: the second is accepted only if the first
    // one's slot was given back.
    let (dest, addr) = daemon(
        &c.key,
        &[
            "--plaintext",
            "--max-concurrent",
            "1",
            "--peer-timeout",
            "5s",
        ],
    );
    let idle_rss = rss_kib(dest.pid());
    let proxy = Proxy::transparent(addr);
    let first = c.send(&proxy, &["--memory", "128MiB", "--dirty-rate", "8MB/s"]);
    proxy.wait_for("round 0 under way", LONG, |s| page_chunks(s) >= 8);
    sigkill(first.pid());
    let first = first.wait(LONG);
    assert!(!first.status.success());
    let out = dest.wait_for_output("failed: ", LONG);
    assert!(
        out.contains("peer closed the"),
        "the destination names the lost source: {out}"
    );
    // Guest memory (128 MiB, pre-faulted) is given back.
    let deadline = std::time::Instant::now() + LONG;
    while rss_kib(dest.pid()) > idle_rss + 48 * 1024 {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination keeps {} KiB resident (idle: {idle_rss} KiB)",
            rss_kib(dest.pid())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = c.send(&proxy, &["--dirty-rate", "8MB/s"]).wait(LONG);
    let out = dest.wait_for_output(" committed: ", LONG);
    let dest = dest.kill();
    assert!(!dest.panicked(), "{}", dest.all());
    assert_committed(&second, &out, &c.json());
}

// ---------------------------------------------------------------------------
// Bytes corrupted on a data channel

/// Runs a migration whose data frames pass through `corrupt` (which
/// returns true once it changed a frame).
fn corrupt_data(
    c: &Case,
    send_extra: &[&str],
    corrupt: impl FnMut(&mut Frame) -> bool + Send + 'static,
) -> (Output, Output, usize) {
    let (dest, addr) = listen(&c.key, &["--plaintext", "--peer-timeout", "5s"]);
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    let corrupt = Mutex::new(corrupt);
    let proxy = Proxy::start(
        addr,
        Box::new(move |f| {
            if is_data(f) && f.dir == Dir::ToDest && (corrupt.lock().unwrap())(f) {
                n.fetch_add(1, Ordering::SeqCst);
            }
            Verdict::Forward
        }),
    );
    let src = c.send(&proxy, send_extra).wait(LONG);
    let dest = dest.wait(LONG);
    (src, dest, count.load(Ordering::SeqCst))
}

/// Offset of the payload in a chunk frame.
fn payload_at(f: &Frame) -> usize {
    HEADER_LEN + f.pages().map_or(0, |h| h.run_count.get() as usize * 16)
}

/// Corrupts the `nth` page chunk (counted from 1) that `pick` accepts.
fn nth(
    nth: usize,
    pick: impl Fn(&Frame) -> bool + Send + 'static,
    flip: impl Fn(&mut Frame) + Send + 'static,
) -> impl FnMut(&mut Frame) -> bool + Send + 'static {
    let mut n = 0;
    move |f| {
        if f.pages().is_some() && pick(f) {
            n += 1;
            if n == nth {
                flip(f);
                return true;
            }
        }
        false
    }
}

/// One frame was corrupted, the chunk sent again, and the migration
/// committed with verified memory.
fn assert_resent(c: &Case, src: &Output, dest: &Output, corrupted: usize) {
    assert_eq!(corrupted, 1);
    let s = assert_committed(src, &dest.stdout, &c.json());
    assert!(s["crc_resends"].as_u64().unwrap() >= 1, "{s}");
}

fn with_payload(f: &Frame) -> bool {
    f.pages().is_some_and(|h| h.payload_len.get() > 0)
}

/// Guest address of a page chunk's first run.
fn first_gpa(f: &Frame) -> u64 {
    u64::from_le_bytes(f.bytes[HEADER_LEN..HEADER_LEN + 8].try_into().unwrap())
}

#[test]
fn payload_bit_flip_is_caught_by_the_payload_tag_and_the_chunk_resent() {
    let c = Case::new();
    let (src, dest, n) = corrupt_data(
        &c,
        &["--dirty-rate", "8MB/s"],
        nth(2, with_payload, |f| {
            let at = payload_at(f) + 5000;
            f.bytes[at] ^= 0x10;
        }),
    );
    assert_resent(&c, &src, &dest, n);
}

/// One data channel of two was closed by the destination for a frame whose
/// header tag did not hold; its chunks went over the other, and the
/// migration committed with every page verified: nothing of the refused
/// frame landed anywhere.
fn assert_refused_before_landing_and_failed_over(c: &Case, src: &Output, dest: &Output) {
    let s = assert_committed(src, &dest.stdout, &c.json());
    assert!(
        dest.all().contains("invalid chunk header tag"),
        "the destination names the refused frame: {}",
        dest.all()
    );
    let chans = s["channels"].as_array().unwrap();
    let failed: Vec<_> = chans.iter().filter(|c| c["state"] == "failed").collect();
    assert_eq!(
        failed.len(),
        1,
        "the channel with the forged frame failed over: {s}"
    );
}

#[test]
fn header_bit_flip_is_refused_before_landing_and_its_channel_fails_over() {
    // The round (bytes 16..20) of the third chunk: the header tag does not
    // hold, the frame is refused before a byte lands and its channel is
    // closed (its framing can no longer be trusted).
    let c = Case::new();
    let (src, dest, n) = corrupt_data(
        &c,
        &["--channels", "2", "--dirty-rate", "8MB/s"],
        nth(3, |_| true, |f| f.bytes[16] ^= 0x01),
    );
    assert_eq!(n, 1);
    assert_refused_before_landing_and_failed_over(&c, &src, &dest);
}

#[test]
fn header_magic_bit_flip_aborts_with_the_field_named() {
    let c = Case::new();
    let (src, dest, n) = corrupt_data(
        &c,
        &["--dirty-rate", "8MB/s"],
        nth(2, |_| true, |f| f.bytes[0] ^= 0x01),
    );
    assert_eq!(n, 1);
    assert_dest_failed(&dest, &["bad magic in chunk header"]);
    // The source only saw its channel close; it names the destination's reason.
    assert_source_kept_guest(
        &src,
        &["the destination aborted: bad magic in chunk header"],
    );
}

#[test]
fn run_table_address_bit_flip_is_refused_before_landing() {
    // An idle guest, so no page is sent twice by itself. The third data
    // chunk's first run is moved down onto pages an earlier chunk already
    // landed. Frame format 1 landed it there (the CRC came after the
    // payload) and only the whole-memory digest stopped the commit; now the
    // header tag refuses it before a byte lands, the chunk goes over the
    // other channel, and the migration commits with every page verified.
    let c = Case::new();
    let (src, dest, n) = corrupt_data(
        &c,
        &["--channels", "2", "--dirty-rate", "0"],
        // Counted over both channels as the proxy sees them, so the chunk
        // at guest address 0 (nothing below it to move onto) can come third
        // when its channel lags: only chunks that start above 0 count.
        nth(
            3,
            |f| with_payload(f) && first_gpa(f) > 0,
            |f| {
                let gpa = first_gpa(f);
                let high = 63 - gpa.leading_zeros();
                let moved = gpa & !(1u64 << high);
                f.bytes[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&moved.to_le_bytes());
            },
        ),
    );
    assert_eq!(n, 1);
    assert_refused_before_landing_and_failed_over(&c, &src, &dest);
}

#[test]
fn run_table_address_bit_flip_on_the_only_channel_aborts_before_landing() {
    let c = Case::new();
    let (src, dest, n) = corrupt_data(
        &c,
        &["--dirty-rate", "0"],
        nth(3, with_payload, |f| f.bytes[HEADER_LEN + 2] ^= 0x10),
    );
    assert_eq!(n, 1);
    assert_dest_failed(&dest, &["invalid chunk header tag"]);
    assert_source_kept_guest(&src, &["invalid chunk header tag"]);
}

#[test]
fn compressed_payload_bit_flip_is_asked_for_again() {
    let c = Case::new();
    // Compressible memory (the synthetic pattern pages are not): 16 MiB of
    // repeated text.
    let img = c.dir.path().join("guest.img");
    let text = b"Ferry moves guest memory; this line repeats so it compresses well. ";
    let image: Vec<u8> = text.iter().copied().cycle().take(16 << 20).collect();
    std::fs::write(&img, image).unwrap();
    let slow = Arc::new(AtomicBool::new(true));
    let s2 = slow.clone();
    // Loopback is faster than the compression workers, so the link is
    // slowed (a few ms per chunk) until a compressed chunk comes by.
    let (src, dest, n) = corrupt_data(
        &c,
        &[
            "--performance-option",
            "compression",
            "--compression",
            "lz4",
            "--dirty-rate",
            "0",
            "--guest-image",
            img.to_str().unwrap(),
        ],
        move |f| {
            let Some(h) = f.pages() else { return false };
            if h.flags.get() & FLAG_COMPRESSED != 0 && s2.swap(false, Ordering::SeqCst) {
                // Inside the segments, past the 16-byte sub-header.
                let at = payload_at(f) + 16 + (h.payload_len.get() as usize - 16) / 2;
                f.bytes[at] ^= 0x40;
                return true;
            }
            if s2.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(15));
            }
            false
        },
    );
    assert_eq!(n, 1, "a compressed chunk came by: {}", src.all());
    assert_resent(&c, &src, &dest, n);
}

#[test]
fn corruption_that_persists_in_the_final_copy_aborts() {
    // Every chunk of the final copy (guest paused) is corrupted: after its
    // retries the source gives up and resumes the guest.
    let c = Case::new();
    let (src, dest, n) = corrupt_data(
        &c,
        &[
            "--dirty-rate",
            "32MB/s",
            "--downtime-limit",
            "1ms",
            "--max-rounds",
            "1",
            "--force-switchover",
        ],
        |f| {
            if f.pages()
                .is_some_and(|h| h.round.get() >= 1 && h.payload_len.get() > 0)
            {
                let at = payload_at(f) + 100;
                f.bytes[at] ^= 0x01;
                return true;
            }
            false
        },
    );
    assert!(n >= 4, "the final copy and its 3 retries were corrupted");
    assert_source_kept_guest(&src, &["still failed verification after 3 retries"]);
    assert_dest_failed(&dest, &["peer aborted the migration: final copy failed"]);
}

// ---------------------------------------------------------------------------
// An attacker on the path (plaintext: it sees and rewrites frames, it has
// neither the pre-shared key nor the session's keys)

/// A key of the attacker's choosing: what it computes tags with.
fn attacker_key() -> MacKey {
    MacKey::from_bytes(*b"an attacker's guess at the key!!")
}

/// Runs a migration through a proxy whose hook sees every frame (both
/// ways, control and data) and returns the outputs.
fn through(c: &Case, send_extra: &[&str], hook: ferry_tests::proxy::Hook) -> (Output, Output) {
    let (dest, addr) = listen(&c.key, &["--plaintext", "--peer-timeout", "5s"]);
    let proxy = Proxy::start(addr, hook);
    let src = c.send(&proxy, send_extra).wait(LONG);
    let dest = dest.wait(LONG);
    (src, dest)
}

#[test]
fn pages_rewritten_in_flight_never_commit_even_with_forged_tags() {
    // Chunk 2 (with pages): a page's bytes replaced by the attacker's.
    // Chunk 4: the same, and the payload tag "fixed" under the attacker's
    // key (the header tag too, since it covers the payload tag). The first
    // lands, fails its payload tag and is sent again; the second is refused
    // before a byte lands and its channel fails over. The guest that
    // commits holds the source's pages only.
    let c = Case::new();
    let mut n = 0;
    let (src, dest) = through(
        &c,
        &["--channels", "2", "--dirty-rate", "0"],
        Box::new(move |f| {
            if !(is_data(f) && f.dir == Dir::ToDest && with_payload(f)) {
                return Verdict::Forward;
            }
            n += 1;
            if n == 2 || n == 4 {
                let at = payload_at(f);
                f.bytes[at..at + 4096].fill(0xee);
            }
            if n == 4 {
                let (mut h, _) = ChunkHeader::decode(&f.bytes).unwrap();
                let table = f.bytes[HEADER_LEN..payload_at(f)].to_vec();
                h.payload_tag = frame::payload_tag(&attacker_key(), h.seq.get(), h.round.get(), 0);
                h.seal(&attacker_key(), &table);
                f.bytes[..HEADER_LEN].copy_from_slice(zerocopy::IntoBytes::as_bytes(&h));
            }
            Verdict::Forward
        }),
    );
    let s = assert_committed(&src, &dest.stdout, &c.json());
    // The rewritten chunk 2 is sent again: as the answer to its Mismatch
    // ack, or, when chunk 4's refusal fails their shared channel before
    // that ack is read, with the channel's unacknowledged chunks on the
    // other (which of the two depends on timing, not on the rule).
    assert!(
        s["crc_resends"].as_u64().unwrap() >= 1 || src.stdout.contains("chunks requeued"),
        "the rewritten page was sent again: {s}\n{}",
        src.all()
    );
    assert!(
        dest.all().contains("invalid chunk header tag"),
        "{}",
        dest.all()
    );
}

#[test]
fn a_dropped_chunk_with_a_forged_ack_never_commits_a_hole() {
    // The third chunk on the first data channel is swallowed, and the next
    // ack going back on that channel is followed by a forged "landed" ack
    // for it (tag under the attacker's key). The source refuses the
    // forgery, fails the channel over and the chunk lands on the other.
    let c = Case::new();
    let (mut first, mut n, mut dropped) = (None, 0, None::<u64>);
    let mut forged = false;
    let (src, dest) = through(
        &c,
        &[
            "--channels",
            "2",
            "--channel-timeout",
            "2s",
            "--dirty-rate",
            "0",
        ],
        Box::new(move |f| {
            if !is_data(f) {
                return Verdict::Forward;
            }
            if *first.get_or_insert(f.conn) != f.conn {
                return Verdict::Forward;
            }
            match (&f.kind, f.dir) {
                (Kind::Chunk(h, ChunkKind::Pages), Dir::ToDest) => {
                    n += 1;
                    if n == 3 {
                        dropped = Some(h.seq.get());
                        return Verdict::Swallow;
                    }
                }
                (Kind::Ack(..), Dir::ToSource) if !forged => {
                    if let Some(seq) = dropped {
                        forged = true;
                        let ack = AckFrame::new(&attacker_key(), seq, AckStatus::Landed);
                        f.bytes
                            .extend_from_slice(zerocopy::IntoBytes::as_bytes(&ack));
                    }
                }
                _ => {}
            }
            Verdict::Forward
        }),
    );
    let s = assert_committed(&src, &dest.stdout, &c.json());
    let chans = s["channels"].as_array().unwrap();
    let failed: Vec<_> = chans.iter().filter(|c| c["state"] == "failed").collect();
    assert_eq!(failed.len(), 1, "{s}");
    let why = failed[0]["error"].as_str().unwrap();
    assert!(
        why.contains("invalid ack tag"),
        "the forged ack was refused: {why}"
    );
}

#[test]
fn a_stale_copy_replayed_after_a_newer_round_is_refused() {
    // A round-0 chunk frame, recorded verbatim (its tags hold: the source
    // made it), is replayed on the same channel right after a frame of a
    // later round. The round gate refuses it before it lands; the channel
    // fails over; what commits is the source's memory.
    let c = Case::new();
    let (mut stale, mut replayed) = (None::<(usize, Vec<u8>)>, false);
    let (src, dest) = through(
        &c,
        &[
            "--channels",
            "2",
            "--channel-timeout",
            "2s",
            "--dirty-rate",
            "32MB/s",
            "--downtime-limit",
            "1ms",
            "--max-rounds",
            "3",
            "--force-switchover",
        ],
        Box::new(move |f| {
            if !(is_data(f) && f.dir == Dir::ToDest && with_payload(f)) {
                return Verdict::Forward;
            }
            let round = f.pages().map_or(0, |h| h.round.get());
            match &stale {
                None if round == 0 => stale = Some((f.conn, f.bytes.clone())),
                Some((conn, bytes)) if !replayed && round >= 1 && *conn == f.conn => {
                    replayed = true;
                    let bytes = bytes.clone();
                    f.bytes.extend_from_slice(&bytes);
                }
                _ => {}
            }
            Verdict::Forward
        }),
    );
    assert!(dest.all().contains("stale copy refused"), "{}", dest.all());
    assert_committed(&src, &dest.stdout, &c.json());
}

// ---------------------------------------------------------------------------
// Stalled and dropped channels

/// Applies `verdict` to the first data connection at its third page chunk.
fn break_first_data_channel(
    verdict: Verdict,
    send_extra: &[&str],
) -> (Case, Output, Output, Vec<Seen>) {
    let c = Case::new();
    let (dest, addr) = listen(&c.key, &["--plaintext", "--peer-timeout", "5s"]);
    let mut first: Option<usize> = None;
    let mut n = 0;
    let proxy = Proxy::start(
        addr,
        Box::new(move |f| {
            if f.pages().is_some() && *first.get_or_insert(f.conn) == f.conn {
                n += 1;
                if n == 3 {
                    return verdict;
                }
            }
            Verdict::Forward
        }),
    );
    let src = c.send(&proxy, send_extra).wait(LONG);
    let dest = dest.wait(LONG);
    let seen = proxy.seen();
    assert!(seen.iter().any(|s| s.verdict == verdict));
    (c, src, dest, seen)
}

fn failover(verdict: Verdict, error: &str) {
    // The healthy channel must not miss its --channel-timeout on a loaded
    // host (an ack held up behind other work for a second would fail it
    // too, and the migration with it): 2 s, as the other two-channel tests
    // here.
    let (c, src, dest, _) = break_first_data_channel(
        verdict,
        &[
            "--channels",
            "2",
            "--channel-timeout",
            "2s",
            "--dirty-rate",
            "8MB/s",
        ],
    );
    let s = assert_committed(&src, &dest.stdout, &c.json());
    let chans = s["channels"].as_array().unwrap();
    assert_eq!(chans.len(), 2, "{s}");
    let failed: Vec<_> = chans.iter().filter(|c| c["state"] == "failed").collect();
    assert_eq!(failed.len(), 1, "exactly the broken channel failed: {s}");
    let why = failed[0]["error"].as_str().unwrap();
    assert!(why.contains(error), "{why}");
}

#[test]
fn stalled_data_channel_fails_over_to_the_other() {
    failover(Verdict::Stall, "did not respond within");
}

#[test]
fn dropped_data_channel_fails_over_to_the_other() {
    failover(Verdict::Drop, "peer closed the data channel");
}

#[test]
fn stalled_only_data_channel_aborts_cleanly() {
    let (_c, src, dest, _) = break_first_data_channel(
        Verdict::Stall,
        &[
            "--channels",
            "1",
            "--channel-timeout",
            "1s",
            "--dirty-rate",
            "8MB/s",
        ],
    );
    assert_source_kept_guest(&src, &["did not respond within"]);
    assert_dest_failed(
        &dest,
        &["peer aborted the migration", "did not respond within"],
    );
}

#[test]
fn a_destination_that_gives_up_behind_a_dead_link_is_heard_at_once() {
    // The only data channel goes through a link that went dead: nothing
    // passes, not even the destination's close (as an RDMA destination's
    // failed channels never reach the source's). The destination gives up
    // first (no progress within its 5 s --peer-timeout) and says why on the
    // control connection; the source, whose channel would wait 60 s, hears
    // it while sending and ends with the destination's reason.
    let (c, src, dest, _) = break_first_data_channel(
        Verdict::Silence,
        &[
            "--channels",
            "1",
            "--channel-timeout",
            "60s",
            "--peer-timeout",
            "60s",
            "--dirty-rate",
            "8MB/s",
        ],
    );
    let dest_said = "pages or messages from the source";
    assert_dest_failed(&dest, &[dest_said]);
    assert_source_kept_guest(&src, &["the destination aborted: "]);
    assert!(src.stderr.contains(dest_said), "{}", src.all());
    let record = summary(&c.json());
    assert_eq!(record["reason"], "peer_aborted", "{record}");
}

#[test]
fn dropped_only_data_channel_aborts_cleanly() {
    let (_c, src, dest, _) =
        break_first_data_channel(Verdict::Drop, &["--channels", "1", "--dirty-rate", "8MB/s"]);
    assert_source_kept_guest(&src, &["peer closed the data channel"]);
    assert_dest_failed(&dest, &["peer closed the data channel", "peer aborted"]);
}

#[test]
fn dropped_control_connection_aborts_cleanly() {
    let c = Case::new();
    let (dest, addr) = listen(&c.key, &["--plaintext", "--peer-timeout", "5s"]);
    let proxy = Proxy::start(
        addr,
        Box::new(|f| {
            if f.msg_name() == Some("RoundDone") {
                return Verdict::Drop;
            }
            Verdict::Forward
        }),
    );
    let src = c
        .send(&proxy, &["--channels", "2", "--dirty-rate", "8MB/s"])
        .wait(LONG);
    let dest = dest.wait(LONG);
    assert_source_kept_guest(&src, &["control connection"]);
    assert_dest_failed(&dest, &["peer closed the control connection"]);
}

#[test]
fn one_stalled_round_trip_does_not_cancel_the_migration() {
    // The first Pong is held for a second, as a busy host may stall one:
    // three such round trips are far over the 300 ms limit, but the ones
    // measured after it are fast. The source measures again instead of
    // cancelling with "the pause cannot fit", and commits.
    let c = Case::new();
    let (dest, addr) = listen(&c.key, &["--plaintext", "--peer-timeout", "5s"]);
    let stalled = AtomicBool::new(false);
    let proxy = Proxy::start(
        addr,
        Box::new(move |f| {
            if f.msg_name() == Some("Pong") && !stalled.swap(true, Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(1));
            }
            Verdict::Forward
        }),
    );
    let src = c.send_judged(&proxy, &["--dirty-rate", "0"]).wait(LONG);
    let dest = dest.wait(LONG);
    let s = assert_committed(&src, &dest.stdout, &c.json());
    assert!(
        src.stderr.contains(
            "the pause's round trips alone are over --downtime-limit: measuring them again"
        ),
        "the stalled round trip was measured: {}",
        src.all()
    );
    assert!(s["rounds"].as_array().unwrap().len() > 2, "{s}");
}

// ---------------------------------------------------------------------------
// Hostile peers (more in bad_input.rs)

#[test]
fn replayed_authentication_is_refused() {
    let c = Case::new();
    let (dest, addr) = daemon(&c.key, &["--plaintext", "--peer-timeout", "5s"]);
    let proxy = Proxy::transparent(addr);
    let src = c
        .send(&proxy, &["--memory", "32MiB", "--dirty-rate", "0"])
        .wait(LONG);
    assert!(src.status.success(), "{}", src.all());
    dest.wait_for_output(" committed: ", LONG);
    // The source's side of the recorded control connection: Hello, Auth,
    // Offer, ... replayed verbatim on a new connection.
    let seen = proxy.seen();
    let control = seen
        .iter()
        .find(|s| s.role == Some(Role::Control))
        .unwrap()
        .conn;
    let frames: Vec<Vec<u8>> = seen
        .iter()
        .filter(|s| s.conn == control && s.dir == Dir::ToDest)
        .map(|s| s.bytes.clone())
        .collect();
    assert!(frames.len() >= 3, "Hello, Auth and Offer were recorded");
    let answer = rt().block_on(async move {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&frames[0]).await.unwrap();
        let mut conn = ferry_transport::conn::Conn::new(s, Duration::from_secs(10));
        let reply = conn.recv("hello reply").await.unwrap();
        assert!(matches!(reply, Msg::HelloReply { .. }), "{reply:?}");
        let mut s = conn.into_stream();
        // The recorded proof answers another challenge.
        s.write_all(&frames[1]).await.unwrap();
        let mut conn = ferry_transport::conn::Conn::new(s, Duration::from_secs(10));
        conn.recv("answer to the replayed Auth").await
    });
    match answer {
        Ok(Msg::Reject { reason, message }) => {
            assert_eq!(reason, RejectReason::Auth);
            assert!(message.contains("authentication failed"), "{message}");
        }
        other => panic!("a replayed Auth must be refused, got {other:?}"),
    }
    let out = dest.wait_for_output("authentication failed", LONG);
    assert_eq!(
        out.matches(" committed: ").count(),
        1,
        "only the real one: {out}"
    );
    let dest = dest.kill();
    assert!(!dest.panicked(), "{}", dest.all());
}
