//! Multichannel end to end.
//!
//! Over loopback (runs everywhere): several channels on one path, TCP and
//! compression. On the namespace test bed (`ci/netns-testbed.sh`: two
//! namespaces, 4 veth links of 1 Gbit/s each, root needed): a migration over
//! 4 links verifies and every link carries a share; one link brought down
//! mid-migration fails over and still verifies; `--migration-network`
//! limits which links carry data and refuses data channels on the others.
//!
//! The test bed tests skip loudly (on the terminal, past the test harness's
//! capture) when not root or without `ip netns`; with
//! `FERRY_REQUIRE_NETNS=1` (CI) they fail instead.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tests::netns::TestBed;
use ferry_tests::{key_file, migrate_ok, summary, Migrated, Output, Proc, KEEPS_RUNNING, KEY};

const SRC: &str = "ferry-src";
const DST: &str = "ferry-dst";

/// Loopback: `--channels 3` over the control connection's path (no
/// interfaces pair on loopback), every channel carries chunks.
fn loopback_channels(option: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let json = dir.path().join("summary.json");
    let Migrated { src, addr, .. } = migrate_ok(
        &key,
        &[],
        &[
            "--memory",
            "128MiB",
            "--dirty-rate",
            "16MB/s",
            "--performance-option",
            option,
            "--channels",
            "3",
            // Small chunks, so that each channel's window holds a few of
            // them and all three get work.
            "--chunk-size",
            "1MiB",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true);
    let ch = s["channels"].as_array().unwrap();
    assert_eq!(ch.len(), 3, "{ch:?}");
    for c in ch {
        assert_eq!(c["state"], "ended", "{c}");
        assert_eq!(c["remote"].as_str().unwrap(), addr.to_string());
        // Plain TCP channels take a chunk only when their window has room,
        // so all three carry some; a compression channel takes a few into
        // its worker pool at once, and on loopback (CPU-bound, no link
        // limit) the first ones may take everything.
        if option == "tcp" {
            assert!(
                c["chunks"].as_u64().unwrap() > 0,
                "every channel carried chunks: {c}"
            );
        }
    }
    assert!(src.stdout.contains("data channels: 3"), "{}", src.all());
}

#[test]
fn three_channels_over_loopback_tcp() {
    loopback_channels("tcp");
}

#[test]
fn three_channels_over_loopback_compression() {
    loopback_channels("compression");
}

// ---------------------------------------------------------------- test bed

/// `ferry listen --once` on `port` in the destination namespace, up.
fn listen_in_dst(dir: &Path, port: u16, extra: &[&str]) -> Proc {
    let key = key_file(dir, "key", KEY);
    let listen = format!("0.0.0.0:{port}");
    let mut args = vec![
        "listen",
        "--listen",
        &listen,
        "--auth-key-file",
        key.to_str().unwrap(),
        "--once",
    ];
    args.extend_from_slice(extra);
    let p = Proc::start_in_netns(DST, &args);
    p.wait_for_output("listening on", Duration::from_secs(20));
    p
}

/// `ferry send` from the source namespace to link 0's address, `port`.
fn send_from_src(dir: &Path, port: u16, json: &Path, extra: &[&str]) -> Proc {
    let key = dir.join("key");
    let to = format!("10.200.0.2:{port}");
    let mut args = vec![
        "send",
        "--to",
        &to,
        "--auth-key-file",
        key.to_str().unwrap(),
        "--performance-option",
        "tcp",
        // The links and channels are the subject, not whether the pause
        // fits the default limit on this host (three round trips count in
        // it; see ferry_tests::migrate_ok).
        "--force-switchover",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Proc::start_in_netns(SRC, &args)
}

/// Waits for the source (`timeout`), then the destination; asserts both
/// succeeded.
fn both_succeed(src: Proc, dest: Proc, timeout: Duration) -> (Output, Output) {
    let src = src.wait(timeout);
    let dest = dest.wait(Duration::from_secs(30));
    assert!(src.status.success(), "source: {}", src.all());
    assert!(dest.status.success(), "destination: {}", dest.all());
    (src, dest)
}

/// Bytes received by a destination-side link of the test bed.
fn rx_bytes(link: &str) -> u64 {
    let out = Command::new("ip")
        .args(["-n", DST, "-j", "-s", "link", "show", link])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["stats64"]["rx"]["bytes"].as_u64().unwrap()
}

fn remotes(s: &serde_json::Value) -> Vec<String> {
    s["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["remote"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn four_links_carry_one_migration_and_it_verifies() {
    let Some(_bed) = TestBed::up("four_links_carry_one_migration_and_it_verifies", SRC, DST) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = listen_in_dst(dir.path(), 6611, &[]);
    let json = dir.path().join("s.json");
    let src = send_from_src(
        dir.path(),
        6611,
        &json,
        &[
            "--memory",
            "512MiB",
            "--dirty-rate",
            "32MB/s",
            "--zero-fraction",
            "0",
        ],
    );
    let (src, _) = both_succeed(src, dest, Duration::from_secs(180));
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true);
    assert_eq!(
        remotes(&s),
        (0..4)
            .map(|i| format!("10.200.{i}.2:6611"))
            .collect::<Vec<_>>()
    );
    let total = s["payload_bytes"].as_u64().unwrap();
    for (i, c) in s["channels"].as_array().unwrap().iter().enumerate() {
        assert_eq!(c["state"], "ended", "{c}");
        assert!(
            c["local"]
                .as_str()
                .unwrap()
                .starts_with(&format!("10.200.{i}.1:")),
            "channel {i} bound to its own link's address: {c}"
        );
        // Four equal links: each carries a fair share (a quarter, give or take).
        let share = c["payload_bytes"].as_u64().unwrap() as f64 / total as f64;
        assert!(
            share > 0.10,
            "channel {i} carried {share:.2} of the pages: {}",
            src.all()
        );
    }
}

#[test]
fn a_link_going_down_mid_migration_fails_over_and_still_verifies() {
    let Some(_bed) = TestBed::up(
        "a_link_going_down_mid_migration_fails_over_and_still_verifies",
        SRC,
        DST,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = listen_in_dst(dir.path(), 6612, &[]);
    let json = dir.path().join("s.json");
    let before = rx_bytes("fdst3");
    let src = send_from_src(
        dir.path(),
        6612,
        &json,
        &[
            "--memory",
            "1GiB",
            "--dirty-rate",
            "32MB/s",
            "--zero-fraction",
            "0",
            "--channel-timeout",
            "2s",
        ],
    );
    // Once link 3 carries pages, take it down under the running migration.
    let start = Instant::now();
    while rx_bytes("fdst3") < before + (48 << 20) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "link 3 never carried pages"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("ip")
        .args(["-n", SRC, "link", "set", "fsrc3", "down"])
        .status()
        .unwrap();
    assert!(st.success());
    let (src, dest) = both_succeed(src, dest, Duration::from_secs(240));
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true, "{}", src.all());
    let ch = s["channels"].as_array().unwrap();
    assert_eq!(ch.len(), 4);
    assert_eq!(ch[3]["state"], "failed", "{}", src.all());
    assert!(ch[3]["payload_bytes"].as_u64().unwrap() > 0);
    assert!(ch[3]["error"].as_str().is_some());
    for c in &ch[..3] {
        assert_eq!(c["state"], "ended", "{c}");
    }
    let d = dest.all();
    assert!(d.contains("committed") && d.contains("verified"), "{d}");
}

#[test]
fn migration_network_limits_the_links_that_carry_data() {
    let Some(_bed) = TestBed::up(
        "migration_network_limits_the_links_that_carry_data",
        SRC,
        DST,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let nets = [
        "--migration-network",
        "10.200.1.0/24",
        "--migration-network",
        "10.200.2.0/24",
    ];
    let dest = listen_in_dst(dir.path(), 6613, &nets);
    let json = dir.path().join("s.json");
    let before: Vec<u64> = (0..4).map(|i| rx_bytes(&format!("fdst{i}"))).collect();
    let src = send_from_src(
        dir.path(),
        6613,
        &json,
        &[
            "--memory",
            "256MiB",
            "--dirty-rate",
            "0",
            "--zero-fraction",
            "0",
        ],
    );
    both_succeed(src, dest, Duration::from_secs(180));
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true);
    assert_eq!(remotes(&s), ["10.200.1.2:6613", "10.200.2.2:6613"]);
    let got: Vec<u64> = (0..4)
        .map(|i| rx_bytes(&format!("fdst{i}")) - before[i])
        .collect();
    // Links 1 and 2 carried the pages; link 0 only the control connection,
    // link 3 nothing of this migration.
    assert!(got[1] > 64 << 20 && got[2] > 64 << 20, "{got:?}");
    assert!(got[0] < 4 << 20 && got[3] < 1 << 20, "{got:?}");

    // A source restricted to link 0 finds no pair and falls back to the
    // control connection's path, which the destination refuses.
    let dest = listen_in_dst(dir.path(), 6614, &nets);
    let json = dir.path().join("refused.json");
    let src = send_from_src(
        dir.path(),
        6614,
        &json,
        &["--memory", "64MiB", "--nic", "10.200.0.1"],
    );
    let src = src.wait(Duration::from_secs(120));
    let dest = dest.wait(Duration::from_secs(30));
    let out = src.all();
    assert!(!src.status.success() && !dest.status.success(), "{out}");
    assert!(
        out.contains("network not allowed")
            && out.contains("data channel to 10.200.0.2 refused: not in --migration-network"),
        "{out}"
    );
    assert!(out.contains(KEEPS_RUNNING), "{out}");
}
