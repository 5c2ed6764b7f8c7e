//! The namespace test bed's cross-process lock (`ferry_tests::netns`): two
//! test processes that want the same bed take turns; neither tears the bed
//! down under the other. Needs root and `ip netns` (skips loudly without,
//! fails with `FERRY_REQUIRE_NETNS=1`). Costs about 3 s.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use ferry_tests::netns::{available, TestBed};

/// This test's own bed (no other test uses these names).
const SRC: &str = "fbed-src";
const DST: &str = "fbed-dst";
/// Set for the child processes: how long (ms) the child keeps the bed.
const HOLD_MS: &str = "FERRY_TESTBED_HOLD_MS";
const CHILD: &str = "a_bed_stays_up_while_its_process_holds_it";

/// Link `dev` of namespace `ns` is there with carrier.
fn link_up(ns: &str, dev: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", dev])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("LOWER_UP")
        })
}

/// The child: brings the bed up, and for `FERRY_TESTBED_HOLD_MS` checks
/// that it stays up (its first and last links, both ends). Run only by
/// [`two_processes_wanting_the_same_bed_take_turns`], in its own process.
#[test]
#[ignore = "run in child processes by two_processes_wanting_the_same_bed_take_turns"]
fn a_bed_stays_up_while_its_process_holds_it() {
    let Some(ms) = std::env::var(HOLD_MS).ok().and_then(|v| v.parse().ok()) else {
        return;
    };
    let bed = TestBed::up(CHILD, SRC, DST).expect("the parent checked root and ip netns");
    let until = Instant::now() + Duration::from_millis(ms);
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
        if Instant::now() >= until {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(bed);
}

#[test]
fn two_processes_wanting_the_same_bed_take_turns() {
    if !available("two_processes_wanting_the_same_bed_take_turns") {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    // Started together; the one holding the bed for less time would tear
    // it down while the other still checks, unless they take turns.
    let child = |ms: &str| {
        Command::new(&exe)
            .args([CHILD, "--exact", "--ignored", "--nocapture"])
            .env(HOLD_MS, ms)
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| child("1500"));
        let b = s.spawn(|| child("700"));
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let all = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    for o in [&a, &b] {
        assert!(o.status.success(), "{}", all(o));
        assert!(
            all(o).contains("1 passed"),
            "the child ran no test: {}",
            all(o)
        );
    }
    // They overlapped: one of them found the bed held and waited.
    let waited = [&a, &b]
        .iter()
        .filter(|o| all(o).contains("is in use by another process"))
        .count();
    assert_eq!(waited, 1, "{}\n----\n{}", all(&a), all(&b));
}
