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

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_tests::netns::TestBed;
use ferry_tests::{ferry_bin, key_file, listen, send};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
const SRC: &str = "ferry-src";
const DST: &str = "ferry-dst";

fn summary(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Loopback: `--channels 3` over the control connection's path (no
/// interfaces pair on loopback), every channel carries chunks.
fn loopback_channels(option: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let (dest, addr) = listen(&key, &[]);
    let json = dir.path().join("summary.json");
    let src = send(
        addr,
        &key,
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
    let dest = dest.wait(Duration::from_secs(30));
    assert!(src.status.success(), "{}", src.all());
    assert!(dest.status.success(), "{}", dest.all());
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

/// A `ferry` process inside a namespace, its output collected.
struct NsProc {
    child: Child,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
    listening: mpsc::Receiver<()>,
}

impl NsProc {
    fn start(ns: &str, args: &[&str]) -> NsProc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(ferry_bin())
            .args(args)
            .env("RUST_LOG", "warn,ferry=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec ferry");
        let (tx, listening) = mpsc::channel();
        let so = child.stdout.take().unwrap();
        let se = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            BufReader::new(so)
                .lines()
                .map_while(Result::ok)
                .fold(String::new(), |s, l| s + &l + "\n")
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            for l in BufReader::new(se).lines().map_while(Result::ok) {
                if l.contains("listening on") {
                    let _ = tx.send(());
                }
                s.push_str(&l);
                s.push('\n');
            }
            s
        });
        NsProc {
            child,
            out,
            err,
            listening,
        }
    }

    fn wait_listening(&self) {
        self.listening
            .recv_timeout(Duration::from_secs(20))
            .expect("ferry listen came up");
    }

    fn wait(mut self, timeout: Duration) -> (bool, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let all = format!(
            "status {status:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.out.join().unwrap(),
            self.err.join().unwrap()
        );
        (status.success(), all)
    }
}

fn listen_in_dst(dir: &Path, port: u16, extra: &[&str]) -> NsProc {
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
    let p = NsProc::start(DST, &args);
    p.wait_listening();
    p
}

fn send_from_src(dir: &Path, port: u16, json: &Path, extra: &[&str]) -> NsProc {
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
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    NsProc::start(SRC, &args)
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
    let (ok, out) = src.wait(Duration::from_secs(180));
    let (dok, dout) = dest.wait(Duration::from_secs(30));
    assert!(ok, "source: {out}");
    assert!(dok, "destination: {dout}");
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
            "channel {i} carried {share:.2} of the pages: {out}"
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
    let (ok, out) = src.wait(Duration::from_secs(240));
    let (dok, dout) = dest.wait(Duration::from_secs(30));
    assert!(ok, "source: {out}");
    assert!(dok, "destination: {dout}");
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true, "{out}");
    let ch = s["channels"].as_array().unwrap();
    assert_eq!(ch.len(), 4);
    assert_eq!(ch[3]["state"], "failed", "{out}");
    assert!(ch[3]["payload_bytes"].as_u64().unwrap() > 0);
    assert!(ch[3]["error"].as_str().is_some());
    for c in &ch[..3] {
        assert_eq!(c["state"], "ended", "{c}");
    }
    assert!(
        dout.contains("committed") && dout.contains("verified"),
        "{dout}"
    );
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
    let (ok, out) = src.wait(Duration::from_secs(180));
    let (dok, dout) = dest.wait(Duration::from_secs(30));
    assert!(ok, "source: {out}");
    assert!(dok, "destination: {dout}");
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
    let (ok, out) = src.wait(Duration::from_secs(120));
    let (dok, _dout) = dest.wait(Duration::from_secs(30));
    assert!(!ok && !dok, "{out}");
    assert!(
        out.contains("network not allowed")
            && out.contains("data channel to 10.200.0.2 refused: not in --migration-network"),
        "{out}"
    );
    assert!(
        out.contains("the guest keeps running on this host (running: true)"),
        "{out}"
    );
}
