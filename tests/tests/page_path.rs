//! The page path against a real destination, played by a source built from
//! the library's own pieces: the round gate shared by every data channel,
//! and receive buffers under a memory attack.

use std::time::Duration;

use ferry_proto::SessionKeys;
use ferry_tests::{
    authed_offer, chunk_frame, data_channel, key, key_file, listen, offer, read_ack, rss_kib, rt,
    KEY,
};
use ferry_transport::layout::PageRun;
use ferry_transport::proto::Msg;
use ferry_transport::wire::AckStatus;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Sends one page of `fill` at page `page` in `round` as chunk `seq`.
async fn send_page(
    s: &mut TcpStream,
    keys: &SessionKeys,
    seq: u64,
    round: u32,
    page: u64,
    fill: u8,
) {
    let runs = [PageRun {
        gpa: page * 4096,
        pages: 1,
        zero: false,
    }];
    s.write_all(&chunk_frame(keys, seq, round, &runs, &[fill; 4096]))
        .await
        .unwrap();
}

#[test]
fn a_frame_older_than_any_channel_has_seen_is_refused_on_every_channel() {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&k, &["--plaintext", "--peer-timeout", "5s"]);
    let rt = rt();
    let held = rt.block_on(async move {
        let mut o = offer(1 << 20);
        o.channels = 2;
        let mut c = authed_offer(addr, &key(), o).await;
        let keys = c.session_keys().unwrap();
        let Msg::Accept(_) = c.recv("accept").await.unwrap() else {
            panic!("expected Accept")
        };
        let mut a = data_channel(addr, &c).await;
        let mut b = data_channel(addr, &c).await;
        // Round 1 begins on channel a...
        send_page(&mut a, &keys, 1, 1, 0, 0x11).await;
        assert_eq!(read_ack(&mut a, &keys).await, Some((1, AckStatus::Landed)));
        // ...so a round-0 frame on channel b, which has seen no frame yet,
        // can only be a stale copy: refused, the channel closed, no ack.
        send_page(&mut b, &keys, 0, 0, 1, 0x22).await;
        assert_eq!(
            read_ack(&mut b, &keys).await,
            None,
            "a stale frame on another channel was accepted"
        );
        // The channel that carried round 1 still works.
        send_page(&mut a, &keys, 2, 1, 2, 0x33).await;
        assert_eq!(read_ack(&mut a, &keys).await, Some((2, AckStatus::Landed)));
        (c, a, b)
    });
    // The control connection goes only once the destination has named the
    // stale frame: closed at once, the destination's loop may take the
    // close before the failed channel (both ready together) and end the
    // migration without looking at that channel again (seen at 16 test
    // threads: "peer closed the control connection" alone).
    dest.wait_for_output(
        "chunk 0 is from round 0, after round 1 began",
        Duration::from_secs(60),
    );
    drop(held);
    let out = dest.wait(Duration::from_secs(30));
    assert!(!out.panicked(), "{}", out.all());
    assert!(
        out.all()
            .contains("chunk 0 is from round 0, after round 1 began"),
        "the destination names the stale frame: {}",
        out.all()
    );
}

/// Header and run table of a compressed frame, valid under the session's
/// keys, announcing a 16 MiB payload for the first 16 pages.
fn announcing_16_mib(keys: &SessionKeys, seq: u64) -> Vec<u8> {
    use ferry_transport::wire::{run_table, ChunkHeader, FLAG_COMPRESSED, MAX_CHUNK_PAYLOAD};
    use zerocopy::IntoBytes;
    let table = run_table(&[PageRun {
        gpa: 0,
        pages: 16,
        zero: false,
    }]);
    let h = ChunkHeader::pages(
        &keys.frame,
        seq,
        0,
        &table,
        MAX_CHUNK_PAYLOAD,
        FLAG_COMPRESSED,
        [0; 16],
    );
    let mut f = h.as_bytes().to_vec();
    f.extend_from_slice(&table);
    f
}

#[test]
fn a_daemon_under_the_16_mib_frame_attack_stays_within_its_reservation() {
    // Issue 10 item 4: 8 channels announcing 16 MiB compressed frames (and
    // a 9th trickling) grew a daemon holding a 64 KiB guest by 136 MiB.
    // Now frames are read a bounded segment at a time, every channel's
    // buffers are booked on the migration's reservation within
    // --memory-limit (a channel that does not fit is refused), and each
    // frame must arrive within --peer-timeout once begun, per channel.
    const LIMIT_MIB: u64 = 2;
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let limit = format!("{LIMIT_MIB}MiB");
    let (dest, addr) = ferry_tests::daemon(
        &k,
        &[
            "--plaintext",
            "--memory-limit",
            &limit,
            "--peer-timeout",
            "4s",
        ],
    );
    let idle = rss_kib(dest.pid());
    let pid = dest.pid();
    let peak = rt().block_on(async move {
        let mut o = offer(64 << 10);
        o.option = ferry_transport::proto::PerformanceOption::Compression { codec: 2, level: 1 };
        o.channels = 9;
        let mut c = authed_offer(addr, &key(), o).await;
        let keys = c.session_keys().unwrap();
        let Msg::Accept(_) = c.recv("accept").await.unwrap() else {
            panic!("expected Accept")
        };
        let mut chans = Vec::new();
        for i in 0..9u64 {
            let mut d = data_channel(addr, &c).await;
            let _ = d.write_all(&announcing_16_mib(&keys, i)).await;
            chans.push(d);
        }
        // Trickle a byte per channel every 100 ms for 3 s; watch the RSS.
        let mut peak = 0;
        for _ in 0..30 {
            for d in &mut chans {
                let _ = d.write_all(&[0]).await;
            }
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Then every channel sends 4 MiB of its 16 as fast as it can.
        let junk = vec![0u8; 1 << 20];
        for d in &mut chans {
            for _ in 0..4 {
                if d.write_all(&junk).await.is_err() {
                    break;
                }
            }
            peak = peak.max(rss_kib(pid));
        }
        drop(chans);
        drop(c);
        peak
    });
    let grown = peak.saturating_sub(idle);
    eprintln!("daemon RSS: idle {idle} KiB, peak {peak} KiB");
    assert!(
        grown < (LIMIT_MIB + 4) * 1024,
        "the daemon grew by {grown} KiB under the attack (--memory-limit {LIMIT_MIB} MiB)"
    );
    let out = dest.wait_for_output("failed: ", Duration::from_secs(60));
    assert!(
        out.contains("receive buffers with another data channel"),
        "channels beyond the limit were refused: {out}"
    );
    // The daemon is alive and serves the next migration.
    let src = ferry_tests::send(
        addr,
        &k,
        &[
            "--plaintext",
            "--memory",
            "1MiB",
            "--dirty-rate",
            "0",
            // The daemon's health is the subject, not the pause (see
            // ferry_tests::migrate_ok).
            "--force-switchover",
        ],
        Duration::from_secs(60),
    );
    assert!(src.status.success(), "{}", src.all());
    let out = dest.kill();
    assert!(!out.panicked(), "{}", out.all());
}
