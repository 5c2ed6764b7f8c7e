//! The compression performance option end to end: real `ferry` processes
//! migrating a compressible guest, and a hostile source sending bad
//! compressed frames or offers to a real destination.

use std::time::Duration;

use ferry_proto::SessionKeys;
use ferry_tests::{
    authed_offer, chunk_frame, data_channel, key, key_file, listen, migrate_ok, offer, read_ack,
    summary, Migrated, KEY,
};
use ferry_transport::compress::{CompressionSpec, Encoder};
use ferry_transport::conn::Conn;
use ferry_transport::layout::PageRun;
use ferry_transport::proto::{Accept, Msg, PerformanceOption, RejectReason};
use ferry_transport::wire::{run_table, AckStatus, ChunkHeader, Codec, FLAG_COMPRESSED};
use tokio::io::AsyncWriteExt;
use zerocopy::IntoBytes;

/// Text-like, compressible content with zero and random pages mixed in.
fn image(pages: usize) -> Vec<u8> {
    let words = [
        "migration ",
        "guest ",
        "page ",
        "memory ",
        "ferry ",
        "kernel ",
    ];
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(pages * 4096);
    for p in 0..pages {
        let mut page = Vec::with_capacity(4096);
        match p % 10 {
            0..=2 => page.resize(4096, 0),
            3 => (0..512).for_each(|_| page.extend_from_slice(&next().to_le_bytes())),
            _ => {
                while page.len() < 4096 {
                    page.extend_from_slice(words[(next() % 6) as usize].as_bytes());
                }
                page.truncate(4096);
            }
        }
        out.extend_from_slice(&page);
    }
    out
}

/// Migrates a guest of `memory` loaded from `image` with the compression
/// option (its codec `codec`, 256 KiB chunks) between two real processes;
/// checks both ended well with the digest verified and the codec named;
/// returns the source's `--json` record.
fn migrate_image(memory: &str, image: &[u8], codec: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let img = dir.path().join("guest.img");
    std::fs::write(&img, image).unwrap();
    let json = dir.path().join("summary.json");
    let Migrated { src, dest, .. } = migrate_ok(
        &k,
        &[],
        &[
            "--memory",
            memory,
            "--dirty-rate",
            "0",
            "--guest-image",
            img.to_str().unwrap(),
            "--performance-option",
            "compression",
            "--compression",
            codec,
            "--chunk-size",
            "256KiB",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true);
    let digest = s["digest"].as_str().unwrap();
    assert!(dest.stdout.contains(digest), "{}", dest.all());
    assert!(
        src.stdout.contains(&format!("over compression ({codec}")),
        "{}",
        src.all()
    );
    s
}

fn migrate(codec: &str) {
    let s = migrate_image("48MiB", &image(8192), codec);
    let c = &s["channels"][0];
    let n = |f: &str| c[f].as_u64().unwrap();
    // 30 % of the image is zero and never travels; every chunk with data
    // went either compressed or raw for a stated reason.
    assert!(
        s["payload_bytes"].as_u64().unwrap() <= 8192 * 4096 * 7 / 10,
        "{s}"
    );
    assert!(
        n("compressed_chunks") + n("raw_incompressible_chunks") + n("raw_link_idle_chunks")
            <= n("chunks"),
        "{c}"
    );
    assert!(n("chunks") > 0);
    let ratio = s["compression_ratio"].as_f64().unwrap();
    if n("compressed_chunks") > n("chunks") / 2 {
        assert!(ratio > 1.3, "mostly compressed, yet ratio {ratio}: {c}");
    }
}

#[test]
fn compression_option_migrates_with_lz4_and_zstd_and_verified_digest() {
    migrate("lz4");
    migrate("zstd:3");
}

#[test]
fn random_memory_goes_raw_past_the_pool_and_lands_identical() {
    // Incompressible memory: after the pool's first failures the page pass
    // stops copying it and it goes raw from guest memory, as on plain TCP;
    // the digest (the destination's hash of every landed page) must match.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..(32 << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let s = migrate_image("32MiB", &random, "zstd:1");
    let c = &s["channels"][0];
    let n = |f: &str| c[f].as_u64().unwrap();
    assert_eq!(n("compressed_chunks"), 0, "{c}");
    assert_eq!(
        n("raw_incompressible_chunks") + n("raw_link_idle_chunks"),
        n("chunks"),
        "{c}"
    );
    assert_eq!(s["payload_bytes"].as_u64().unwrap(), 32 << 20, "{s}");
}

/// Starts a real destination, runs `f` as a hostile source, returns what the
/// destination printed. The hostile source speaks plaintext: the
/// destination runs with `--plaintext`.
fn against_destination<F, Fut>(f: F) -> ferry_tests::Output
where
    F: FnOnce(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    let k = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&k, &["--plaintext"]);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f(addr));
    let out = dest.wait(Duration::from_secs(30));
    assert!(!out.panicked(), "destination panicked: {}", out.all());
    assert_eq!(out.status.code(), Some(1), "{}", out.all());
    out
}

async fn session(addr: std::net::SocketAddr, option: PerformanceOption) -> (Conn, Msg) {
    let mut o = offer(1 << 20);
    o.option = option;
    let mut c = authed_offer(addr, &key(), o).await;
    let answer = c.recv("the answer to the offer").await.unwrap();
    (c, answer)
}

#[test]
fn unknown_codec_id_in_the_offer_is_rejected_with_the_reason() {
    let out = against_destination(|addr| async move {
        let (_, answer) =
            session(addr, PerformanceOption::Compression { codec: 9, level: 0 }).await;
        match answer {
            Msg::Reject { reason, message } => {
                assert_eq!(reason, RejectReason::Option);
                assert!(message.contains("unknown codec id 9"), "{message}");
            }
            m => panic!("expected Reject, got {m:?}"),
        }
    });
    assert!(out.stdout.contains("unknown codec id 9"), "{}", out.all());
}

/// A compressed frame for one 4-page run at guest address 0, as a source
/// holding the session's keys builds it, with the sub-header fields given
/// (codec id, claimed uncompressed size) and one segment; `fix` may damage
/// the segment. The tags hold (they cover the pages the source read and
/// the header), so only decoding the payload can notice.
fn frame(
    keys: &SessionKeys,
    codec_id: u8,
    claimed: u32,
    fix: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let run = PageRun {
        gpa: 0,
        pages: 4,
        zero: false,
    };
    let pages: Vec<u8> = (0..4 * 4096u32).map(|i| (i / 64 % 7) as u8).collect();
    let mut enc = Encoder::new(CompressionSpec {
        codec: Codec::Zstd,
        level: 1,
    })
    .unwrap();
    let mut seg = vec![0u8; enc.bound(pages.len())];
    let n = enc.compress(&pages, &mut seg).unwrap();
    seg.truncate(n);
    fix(&mut seg);
    let mut payload = vec![codec_id, 0, 1, 0];
    payload.extend_from_slice(&claimed.to_le_bytes());
    payload.extend_from_slice(&(4 + seg.len() as u32).to_le_bytes());
    payload.extend_from_slice(&[0; 4]);
    payload.extend_from_slice(&(seg.len() as u32).to_le_bytes());
    payload.extend_from_slice(&seg);
    // The payload tag is that of the uncompressed pages.
    let plain = chunk_frame(keys, 1, 0, &[run], &pages);
    let (tagged, _) = ChunkHeader::decode(&plain).unwrap();
    let table = run_table(&[run]);
    let header = ChunkHeader::pages(
        &keys.frame,
        1,
        0,
        &table,
        payload.len() as u32,
        FLAG_COMPRESSED,
        tagged.payload_tag,
    );
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(&table);
    out.extend_from_slice(&payload);
    out
}

/// Opens a zstd session, sends the frame `f` builds, and returns its ack
/// (and what the destination printed once the session is dropped).
fn one_frame(f: fn(&SessionKeys) -> Vec<u8>) -> (Option<(u64, AckStatus)>, ferry_tests::Output) {
    let mut ack = None;
    let out = against_destination(|addr| {
        let ack = &mut ack;
        async move {
            let (c, answer) = session(
                addr,
                PerformanceOption::Compression {
                    codec: Codec::Zstd.id(),
                    level: 1,
                },
            )
            .await;
            let keys = c.session_keys().unwrap();
            let Msg::Accept(Accept { .. }) = answer else {
                panic!("expected Accept, got {answer:?}")
            };
            let mut data = data_channel(addr, &c).await;
            data.write_all(&f(&keys)).await.unwrap();
            *ack = read_ack(&mut data, &keys).await;
        }
    });
    (ack, out)
}

#[test]
fn a_well_formed_frame_lands_and_is_acknowledged() {
    // The frame builder itself is right: only the damage below is refused.
    let (ack, _) = one_frame(|k| frame(k, Codec::Zstd.id(), 4 * 4096, |_| {}));
    assert_eq!(ack, Some((1, AckStatus::Landed)));
}

/// A payload that does not decode is the source's frame damaged on the way
/// (its header tag holds): the destination names the damage and asks for
/// the chunk again.
fn refused_with(ack: Option<(u64, AckStatus)>, out: &ferry_tests::Output, why: &str) {
    assert_eq!(ack, Some((1, AckStatus::Mismatch)), "{}", out.all());
    assert!(out.all().contains(why), "{}", out.all());
    assert!(
        out.all().contains("asking for the chunk again"),
        "{}",
        out.all()
    );
}

#[test]
fn corrupt_compressed_payload_is_named_and_asked_for_again() {
    let (ack, out) = one_frame(|k| {
        frame(k, Codec::Zstd.id(), 4 * 4096, |seg| {
            for b in seg.iter_mut().skip(4) {
                *b ^= 0xa5;
            }
        })
    });
    refused_with(
        ack,
        &out,
        "the zstd segment of the run at 0x0 (4 pages) does not decompress",
    );
}

#[test]
fn claimed_uncompressed_size_other_than_the_run_is_refused() {
    let (ack, out) = one_frame(|k| frame(k, Codec::Zstd.id(), 1 << 30, |_| {}));
    refused_with(
        ack,
        &out,
        "compressed payload claims 1073741824 bytes but its non-zero runs hold 16384",
    );
}

#[test]
fn unknown_codec_id_in_a_frame_is_named() {
    let (ack, out) = one_frame(|k| frame(k, 7, 4 * 4096, |_| {}));
    refused_with(ack, &out, "unknown codec id 7");
}
