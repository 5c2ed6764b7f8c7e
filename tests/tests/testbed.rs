//! The namespace test bed's cross-process lock (`ferry_tests::netns`): a
//! second test process that wants a bed another one holds waits for it;
//! neither tears the bed down under the other. Needs root and `ip netns`
//! (skips loudly without, fails with `FERRY_REQUIRE_NETNS=1`). Costs about
//! 2 s.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::netns::{available, TestBed};

/// This test's own bed (no other test uses these names).
const SRC: &str = "fbed-src";
const DST: &str = "fbed-dst";
/// Set for the child processes: the file whose appearance ends the
/// child's hold on the bed.
const RELEASE: &str = "FERRY_TESTBED_RELEASE";
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
    let Some(release) = std::env::var_os(RELEASE) else {
        return;
    };
    let bed = TestBed::up(CHILD, SRC, DST).expect("the parent checked root and ip netns");
    println!("{HOLDING}");
    let start = Instant::now();
    loop {
        for (ns, dev) in [
            (SRC, "fsrc0"),
            (DST, "fdst0"),
            (SRC, "fsrc3"),
            (DST, "fdst3"),
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

/// Starts a child holding the bed until `release` exists.
fn child(release: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([CHILD, "--exact", "--ignored", "--nocapture"])
        .env(RELEASE, release)
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

/// Waits for a child and returns whether it succeeded, with its output.
fn finish(c: Child) -> (bool, String) {
    let o = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success() && text.contains("1 passed"), text)
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
    let mut a = child(&go_a);
    assert!(
        read_until(a.stdout.as_mut().unwrap(), HOLDING),
        "the first process never held the bed: {}",
        finish(a).1
    );
    // a holds the bed until told: b must wait for it (and say so), not
    // bring it up beside a, nor tear it down under a.
    let mut b = child(&go_b);
    let waited = read_until(b.stderr.as_mut().unwrap(), "is in use by another process");
    std::fs::write(&go_a, b"").unwrap();
    let (a_ok, a_out) = finish(a);
    let (b_ok, b_out) = finish(b);
    assert!(
        waited,
        "the second process did not wait for the bed: {b_out}\n----\n{a_out}"
    );
    assert!(a_ok, "{a_out}");
    assert!(b_ok, "{b_out}");
}
