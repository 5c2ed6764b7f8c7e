//! Operations: admission on the destination (slots, queue, memory over all
//! migrations, --migration-network before authentication, stalled peers),
//! the bandwidth cap, and what happens when a guest cannot converge
//! (--max-rounds, --timeout, --auto-converge).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ferry_tests::{
    assert_guest_kept, authed_session, daemon, key, key_file, listen, offer, rt, send, summary,
    Output, KEY,
};
use ferry_transport::conn::Conn;
use ferry_transport::proto::{Msg, RejectReason};
use ferry_transport::TransportError;

const MIB: u64 = 1 << 20;

/// Authenticates and offers `bytes` (an error: refused before the offer).
async fn offer_only(addr: SocketAddr, bytes: u64) -> Result<Conn, TransportError> {
    let mut c = Conn::new(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        Duration::from_secs(30),
    );
    c.client_handshake(&key()).await?;
    c.send(&Msg::Offer(offer(bytes))).await?;
    Ok(c)
}

/// Authenticates and offers `bytes`; the destination's answer.
async fn try_offer(addr: SocketAddr, bytes: u64) -> (Option<Conn>, Result<Msg, TransportError>) {
    match offer_only(addr, bytes).await {
        Ok(mut c) => {
            let r = c.recv("the answer to the offer").await;
            (Some(c), r)
        }
        Err(e) => (None, Err(e)),
    }
}

fn rejected(r: &Result<Msg, TransportError>, want: RejectReason) -> String {
    match r {
        Err(TransportError::Rejected { reason, message }) if *reason == want => message.clone(),
        Ok(Msg::Reject { reason, message }) if *reason == want => message.clone(),
        other => panic!("expected a {want} rejection, got {other:?}"),
    }
}

/// `ferry send` of an idle guest of `memory` with `extra`: refused by
/// admission in some cases, committed in others. `--force-switchover`:
/// admission is the subject, not whether the pause fits the default limit
/// on this host (three round trips count in it; see `ferry_tests::migrate_ok`).
fn small_send(addr: SocketAddr, k: &Path, memory: &str, extra: &[&str]) -> Output {
    let mut args = vec!["--memory", memory, "--dirty-rate", "0", FORCED];
    args.extend_from_slice(extra);
    send(addr, k, &args, Duration::from_secs(60))
}

#[test]
fn a_full_destination_queues_the_next_migration_and_refuses_beyond_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    // --plaintext: the hand-made peers below speak plaintext.
    let (dest, addr) = daemon(
        &k,
        &[
            "--plaintext",
            "--max-concurrent",
            "1",
            "--queue",
            "1",
            "--queue-timeout",
            "30s",
        ],
    );
    let r = rt();
    // One migration runs (and holds its slot: it sends nothing).
    let (running, _) = r.block_on(authed_session(addr, &key(), 4 * MIB));
    // The next one is authenticated and its offer sent: it waits in the
    // queue once the destination has read it (it says so).
    let mut waiting = r.block_on(offer_only(addr, 4 * MIB)).unwrap();
    let queued = r.spawn(async move {
        let ans = waiting.recv("the answer to the offer").await;
        (waiting, ans)
    });
    dest.wait_for_output("no free slot: migration queued", Duration::from_secs(30));
    // A third is refused as busy, before authentication, with the numbers.
    let (_, ans) = r.block_on(try_offer(addr, 4 * MIB));
    let msg = rejected(&ans, RejectReason::Busy);
    assert!(
        msg.contains("1 migrations running (--max-concurrent 1)")
            && msg.contains("1 waiting (--queue 1)"),
        "{msg}"
    );
    // `ferry send` prints the reason and exits non-zero, guest running.
    let out = small_send(addr, &k, "8MiB", &[]);
    assert_guest_kept(&out);
    assert!(
        out.stderr.contains("busy") && out.stderr.contains("--max-concurrent 1"),
        "{}",
        out.all()
    );
    // The running one goes away: the queued one is accepted.
    drop(running);
    let (_c, ans) = r.block_on(queued).unwrap();
    assert!(
        matches!(ans, Ok(Msg::Accept(_))),
        "the queued migration is accepted once the slot frees: {ans:?}"
    );
    let out = dest.kill();
    assert!(!out.panicked(), "{}", out.all());
}

#[test]
fn memory_limit_bounds_the_sum_of_accepted_migrations() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = daemon(
        &k,
        &[
            "--plaintext",
            "--memory-limit",
            "64MiB",
            "--max-concurrent",
            "4",
        ],
    );
    let r = rt();
    let (first, _) = r.block_on(authed_session(addr, &key(), 40 * MIB));
    let (_, ans) = r.block_on(try_offer(addr, 40 * MIB));
    let msg = rejected(&ans, RejectReason::MemoryLimit);
    // Each migration books its guest memory and its first data channel's
    // receive buffers.
    let buffers = ferry_transport::reservation::channel_allowance(
        ferry_transport::proto::PerformanceOption::Tcp,
    );
    assert!(
        msg.contains(&format!(
            "40.00 MiB ({} bytes) (and {} of receive buffers for its first data channel) plus the {} of the migrations",
            40 * MIB,
            ferry_migration::units::human_exact(buffers),
            ferry_migration::units::human_exact(40 * MIB + buffers),
        )) && msg.contains(&format!("--memory-limit of 64.00 MiB ({} bytes)", 64 * MIB)),
        "{msg}"
    );
    // A smaller one still fits beside it.
    let (small, ans) = r.block_on(try_offer(addr, 16 * MIB));
    assert!(matches!(ans, Ok(Msg::Accept(_))), "{ans:?}");
    // Once the first ends, its memory is released (within a minute: a
    // count of tries would bound it at a few seconds, which a loaded host
    // may need to see the close).
    drop((first, small));
    let mut accepted = false;
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < until {
        let (_c, ans) = r.block_on(try_offer(addr, 40 * MIB));
        if matches!(ans, Ok(Msg::Accept(_))) {
            accepted = true;
            break;
        }
        rejected(&ans, RejectReason::MemoryLimit);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(accepted, "the first migration's memory was released");
    let out = dest.kill();
    assert!(!out.panicked(), "{}", out.all());
}

#[test]
fn peers_outside_the_migration_network_are_refused_before_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&k, &["--plaintext", "--migration-network", "127.0.0.1/32"]);
    let r = rt();
    r.block_on(async {
        // From 127.0.0.2 (loopback holds all of 127/8): the reason arrives
        // before this peer has sent a single byte.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let stream = sock.connect(addr).await.unwrap();
        let mut c = Conn::new(stream, Duration::from_secs(10));
        match c.recv("the refusal").await {
            Ok(Msg::Reject {
                reason: RejectReason::Network,
                message,
            }) => assert!(
                message.contains("127.0.0.2") && message.contains("127.0.0.1/32"),
                "{message}"
            ),
            other => panic!("expected a network rejection, got {other:?}"),
        }
        // A full handshake attempt from there fails the same way.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut c = Conn::new(sock.connect(addr).await.unwrap(), Duration::from_secs(10));
        let e = c.client_handshake(&key()).await.unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::Rejected {
                    reason: RejectReason::Network,
                    ..
                }
            ),
            "{e}"
        );
    });
    // The refusals were not migration attempts: --once still serves this
    // one from inside the network.
    let out = small_send(addr, &k, "8MiB", &[]);
    assert!(out.status.success(), "{}", out.all());
    let d = dest.wait(Duration::from_secs(30));
    assert!(d.status.success(), "{}", d.all());
    assert_eq!(
        d.stderr.matches("refused before authentication").count(),
        2,
        "refusals are logged (and counted): {}",
        d.all()
    );
}

/// A daemon with one slot, one queue place and room for `memory` of guest
/// (`--plaintext`: the hand-made stalled peers speak plaintext).
fn one_slot(k: &Path, memory: &str, extra: &[&str]) -> (ferry_tests::Proc, SocketAddr) {
    let mut args = vec![
        "--plaintext",
        "--max-concurrent",
        "1",
        "--memory-limit",
        memory,
        "--queue",
        "1",
        "--queue-timeout",
        "60s",
    ];
    args.extend_from_slice(extra);
    daemon(k, &args)
}

#[test]
fn a_stalled_authenticated_peer_is_timed_out_and_its_slot_and_memory_freed() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    // The real migration below fits only once the stalled one's slot and
    // memory are released. The timeout applies to the real migrations too:
    // 5 s, as a loaded host can keep a real source quiet for 2 s (seen:
    // "peer did not respond within 2s" for the real one, 2 runs in 6).
    let (dest, addr) = one_slot(&k, "48MiB", &["--peer-timeout", "5s"]);
    let r = rt();
    // Authenticates, gets its 40 MiB allocated, then says nothing more.
    let (stalled, _) = r.block_on(authed_session(addr, &key(), 40 * MIB));
    let out = small_send(addr, &k, "32MiB", &[]);
    assert!(out.status.success(), "{}", out.all());
    // The same with a data channel open and silent.
    let (stalled_data, _) = r.block_on(authed_session(addr, &key(), 40 * MIB));
    let channel = r.block_on(ferry_tests::data_channel(addr, &stalled_data));
    let out = small_send(addr, &k, "32MiB", &[]);
    assert!(out.status.success(), "{}", out.all());
    drop((stalled, stalled_data, channel));
    let d = dest.kill();
    let timed_out =
        "peer did not respond within 5s while waiting for pages or messages from the source";
    assert_eq!(
        d.stdout.matches(timed_out).count(),
        2,
        "both stalled peers were timed out: {}",
        d.all()
    );
}

#[test]
fn bandwidth_limit_holds_for_all_channels_together_within_10_percent() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let json = dir.path().join("s.json");
    let (dest, addr) = listen(&k, &[]);
    // 16 MB/s: far below what loopback does, so the cap is what limits,
    // on a loaded host too (40 MB/s was not reached there: 31.9 MB/s over
    // TLS with the CPU shared, 2 runs in 6).
    let out = send(
        addr,
        &k,
        &[
            FORCED,
            "--memory",
            "64MiB",
            "--dirty-rate",
            "0",
            "--zero-fraction",
            "0",
            "--performance-option",
            "tcp",
            "--channels",
            "3",
            "--chunk-size",
            "1MiB",
            "--bandwidth-limit",
            "16MB/s",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", out.all());
    assert!(dest.wait(Duration::from_secs(30)).status.success());
    let s = summary(&json);
    let rate = s["wire_bytes_per_sec"].as_f64().unwrap();
    assert!(
        (rate - 16e6).abs() <= 1.6e6,
        "achieved {rate:.0} B/s on the wire against a 16 MB/s cap: {s}"
    );
    assert_eq!(s["bandwidth_limit"], 16_000_000);
    let chans = s["channels"].as_array().unwrap();
    assert_eq!(chans.len(), 3, "{s}");
    assert!(
        chans
            .iter()
            .all(|c| c["bytes_on_wire"].as_u64().unwrap() > 4 * MIB),
        "every channel carried pages under the one cap: {s}"
    );
    assert!(out.stdout.contains("bandwidth limit"), "{}", out.all());
}

/// `--force-switchover`, for migrations here that must commit and whose pause
/// is not what the test checks (see [`small_send`]).
const FORCED: &str = "--force-switchover";

/// A 16 MiB guest asking to dirty 40 MB/s behind a 5 MB/s link never
/// converges: a 200 ms pause fits 1 MB at 5 MB/s, less than its hot
/// sixteenth of memory alone, and a round of the whole guest takes over
/// three seconds, so even a guest starved of CPU (a loaded machine, a debug
/// build) that manages a fifth of its rate dirties more than the link moves.
/// The limit leaves room for the pause's three control round trips on a
/// loaded machine (up to 66 ms each): with 50 ms (a 4 MiB guest), round
/// trips of 24 ms alone made the pause unable to fit and the migrations
/// were cancelled for that instead of for the reason each test checks.
const BUSY: [&str; 12] = [
    "--downtime-limit",
    "200ms",
    "--memory",
    "16MiB",
    "--dirty-rate",
    "40MB/s",
    "--performance-option",
    "tcp",
    "--bandwidth-limit",
    "5MB/s",
    "--chunk-size",
    "256KiB",
];

/// The busy-guest tests each keep a core busy dirtying: one at a time.
fn one_busy_guest() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_guest_that_cannot_converge_is_cancelled_after_max_rounds_and_the_destination_freed() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    // The migration after the cancelled one is accepted only if
    // everything was released (16 MiB of guest, and room for receive
    // buffers).
    let (dest, addr) = one_slot(&k, "17MiB", &[]);
    let _one = one_busy_guest();
    let mut args = BUSY.to_vec();
    args.extend(["--max-rounds", "4"]);
    let out = send(addr, &k, &args, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(3), "{}", out.all());
    assert_guest_kept(&out);
    assert!(
        out.stderr.contains("did not converge after 4 rounds")
            && out.stderr.contains("predicted downtime")
            && out.stderr.contains("> limit 200 ms"),
        "{}",
        out.all()
    );
    let out = small_send(addr, &k, "16MiB", &[]);
    assert!(out.status.success(), "{}", out.all());
    let d = dest.kill();
    assert!(
        d.stdout.contains("did not converge"),
        "the destination was told why: {}",
        d.all()
    );
}

/// Migrates the busy guest with `extra` flags to a `--once` destination;
/// both must succeed. The source's output and `--json` summary.
fn busy_committed(extra: &[&str]) -> (Output, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let json = dir.path().join("s.json");
    let (dest, addr) = listen(&k, &[]);
    let _one = one_busy_guest();
    let mut args = BUSY.to_vec();
    args.extend(extra);
    args.extend(["--json", json.to_str().unwrap()]);
    let out = send(addr, &k, &args, Duration::from_secs(180));
    assert!(out.status.success(), "{}", out.all());
    let d = dest.wait(Duration::from_secs(30));
    assert!(d.status.success(), "{}", d.all());
    (out, summary(&json))
}

#[test]
fn force_switchover_switches_over_a_guest_that_cannot_converge() {
    let (out, s) = busy_committed(&["--max-rounds", "2", "--force-switchover"]);
    assert_eq!(s["converge_reason"], "round_cap", "{s}");
    assert!(s["predicted_downtime_ms"].as_f64().unwrap() > 200.0, "{s}");
    assert!(out.stdout.contains("--force-switchover"), "{}", out.all());
}

#[test]
fn auto_converge_throttles_a_busy_guest_until_it_converges() {
    let (out, s) = busy_committed(&["--auto-converge", "--max-rounds", "100"]);
    assert_eq!(s["converge_reason"], "fits_downtime", "{s}");
    let throttle = s["throttle_percent"].as_u64().unwrap();
    assert!(throttle >= 20, "{s}");
    let per_round: Vec<u64> = s["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["throttle_percent"].as_u64().unwrap())
        .collect();
    assert_eq!(per_round[0], 0, "no throttle before rounds stall: {s}");
    assert!(
        per_round.windows(2).all(|w| w[0] <= w[1]),
        "the throttle only rises, in steps: {per_round:?}"
    );
    assert!(
        out.stdout
            .contains(&format!("auto-converge: guest throttled {throttle}%")),
        "{}",
        out.all()
    );
}

#[test]
fn the_overall_timeout_cancels_pre_copy() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&k, &[]);
    let _one = one_busy_guest();
    let mut args = BUSY.to_vec();
    args.extend(["--max-rounds", "1000", "--timeout", "2s"]);
    let out = send(addr, &k, &args, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(3), "{}", out.all());
    assert_guest_kept(&out);
    assert!(
        out.stderr
            .contains("--timeout of 2s reached in pre-copy round"),
        "{}",
        out.all()
    );
    let d = dest.wait(Duration::from_secs(30));
    assert!(
        d.stdout.contains("--timeout of 2s reached"),
        "the destination was told why: {}",
        d.all()
    );
}

#[test]
fn compression_under_a_bandwidth_limit_keeps_the_cap_and_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let json = dir.path().join("s.json");
    // Pages half noise, half zero: about 2x with zstd.
    let img = dir.path().join("img");
    let mut bytes = Vec::with_capacity(24 << 20);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..(24 << 20) / 4096 {
        for _ in 0..2048 / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        bytes.extend_from_slice(&[0u8; 2048]);
    }
    std::fs::write(&img, bytes).unwrap();
    let (dest, addr) = listen(&k, &[]);
    let out = send(
        addr,
        &k,
        &[
            FORCED,
            "--memory",
            "24MiB",
            "--dirty-rate",
            "0",
            "--guest-image",
            img.to_str().unwrap(),
            "--performance-option",
            "compression",
            // The cap is the link, by a margin a CPU-starved host still
            // keeps: the workers need only about twice its rate of input.
            // (At 10 MB/s with 4 MiB chunks, a loaded host compressed too
            // slowly to keep the link busy: the sender rightly sent chunks
            // raw rather than let the link idle, 2 of 6, and the ratio fell
            // to 1.3-1.5.) Small chunks: the first one, raw while the link is
            // idle at the start, is 1 of 24.
            "--bandwidth-limit",
            "4MB/s",
            "--chunk-size",
            "1MiB",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", out.all());
    assert!(dest.wait(Duration::from_secs(30)).status.success());
    let s = summary(&json);
    let wire = s["wire_bytes_per_sec"].as_f64().unwrap();
    assert!(wire <= 4.4e6, "the cap holds for compressed frames: {s}");
    assert!(s["compression_ratio"].as_f64().unwrap() > 1.5, "{s}");
    let sum = |f: &str| -> u64 {
        s["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c[f].as_u64().unwrap())
            .sum()
    };
    assert!(
        sum("compressed_chunks") > sum("raw_link_idle_chunks"),
        "a capped link is busy, so chunks are compressed rather than sent raw: {s}"
    );
}
