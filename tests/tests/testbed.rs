//! The namespace test bed's cross-process lock (`ferry_tests::netns`, and
//! `ci/netns-testbed.sh up` for scripts): a second test process that wants
//! a bed another one holds waits for it, whether a test or a script holds
//! it; neither tears the bed down under the other. Needs root and `ip
//! netns` (skips loudly without, fails with `FERRY_REQUIRE_NETNS=1`). Costs
//! about 3 s.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::netns::{available, script, TestBed};

/// Each test's own bed (no other test uses these names).
const BED_A: (&str, &str) = ("fbed-src", "fbed-dst");
const BED_B: (&str, &str) = ("fbsh-src", "fbsh-dst");
/// Set for the child processes: the file whose appearance ends the
/// child's hold on the bed, and the bed's namespaces.
const RELEASE: &str = "FERRY_TESTBED_RELEASE";
const NAMES: &str = "FERRY_TESTBED_NAMES";
const CHILD: &str = "a_bed_stays_up_while_its_process_holds_it";
/// Printed by a child once it holds the bed.
const HOLDING: &str = "HOLDING THE BED";

/// Link `dev` of namespace `ns` is there with carrier.
fn link_up(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", dev])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("LOWER_UP")
        })
}

/// The child: brings the bed up, says so, and until the file named by
/// `FERRY_TESTBED_RELEASE` exists checks that the bed stays up (its first
/// and last links, both ends). Run only by
/// [`a_second_process_waits_for_the_bed_another_holds`], in its own process.
#[test]
#[ignore = "run in child processes by a_second_process_waits_for_the_bed_another_holds"]
fn a_bed_stays_up_while_its_process_holds_it() {
    let (Some(release), Ok(names)) = (std::env::var_os(RELEASE), std::env::var(NAMES)) else {
        return;
    };
    let (src, dst) = names.split_once(' ').unwrap();
    let bed = TestBed::up(CHILD, src, dst).expect("the parent checked root and ip netns");
    println!("{HOLDING}");
    let start = Instant::now();
    loop {
        for (ns, dev) in [
            (src, "fsrc0"),
            (dst, "fdst0"),
            (src, "fsrc3"),
            (dst, "fdst3"),
        ] {
            assert!(
                link_up(ns, dev),
                "{ns}/{dev} went away while this process held the bed"
            );
        }
        if Path::new(&release).exists() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "never released");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(bed);
}

/// Starts a child holding `bed` until `release` exists.
fn child(bed: (&str, &str), release: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([CHILD, "--exact", "--ignored", "--nocapture"])
        .env(RELEASE, release)
        .env(NAMES, format!("{} {}", bed.0, bed.1))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Reads `from` until a line contains `needle`; false at its end.
fn read_until(from: impl std::io::Read, needle: &str) -> bool {
    BufReader::new(from)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains(needle))
}

/// Waits for a process (killed after two minutes: one that waits for a
/// lock nobody releases would hang the run) and returns whether it
/// succeeded, with its output.
fn finish(mut c: Child) -> (bool, String) {
    let start = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn a_second_process_waits_for_the_bed_another_holds() {
    if !available("a_second_process_waits_for_the_bed_another_holds") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (go_a, go_b) = (dir.path().join("a"), dir.path().join("b"));
    // b may go as soon as it holds the bed: only a's hold is at stake.
    std::fs::write(&go_b, b"").unwrap();
    let mut a = child(BED_A, &go_a);
    assert!(
        read_until(a.stdout.as_mut().unwrap(), HOLDING),
        "the first process never held the bed: {}",
        finish(a).1
    );
    // a holds the bed until told: b must wait for it (and say so), not
    // bring it up beside a, nor tear it down under a.
    let mut b = child(BED_A, &go_b);
    let waited = read_until(b.stderr.as_mut().unwrap(), "is in use by another process");
    std::fs::write(&go_a, b"").unwrap();
    let (a_ok, a_out) = finish(a);
    let (b_ok, b_out) = finish(b);
    assert!(
        waited,
        "the second process did not wait for the bed: {b_out}\n----\n{a_out}"
    );
    assert!(a_ok && a_out.contains("1 passed"), "{a_out}");
    assert!(b_ok && b_out.contains("1 passed"), "{b_out}");
}

#[test]
fn a_test_waits_for_the_bed_a_script_brought_up() {
    if !available("a_test_waits_for_the_bed_a_script_brought_up") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let go_b = dir.path().join("b");
    std::fs::write(&go_b, b"").unwrap();
    // A benchmark's use of the bed: up, work (until told), down.
    let mut bench = Command::new("bash")
        .arg("-c")
        .arg(r#"bash "$0" up && echo UP && { read -r _; bash "$0" down; }"#)
        .arg(script())
        .env("FERRY_TESTBED_SRC", BED_B.0)
        .env("FERRY_TESTBED_DST", BED_B.1)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        read_until(bench.stdout.as_mut().unwrap(), "UP"),
        "the script did not bring the bed up: {}",
        finish(bench).1
    );
    let mut b = child(BED_B, &go_b);
    let waited = read_until(b.stderr.as_mut().unwrap(), "is in use by another process");
    // Lets the script go on: it tears its bed down, then the test has it.
    drop(bench.stdin.take());
    let (bench_ok, bench_out) = finish(bench);
    let (b_ok, b_out) = finish(b);
    assert!(
        waited,
        "the test did not wait for the script's bed: {b_out}\n----\n{bench_out}"
    );
    assert!(
        bench_ok && bench_out.contains("netns test bed down"),
        "{bench_out}"
    );
    assert!(b_ok && b_out.contains("1 passed"), "{b_out}");
}
