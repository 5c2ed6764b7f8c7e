//! The namespace test bed of `ci/netns-testbed.sh` (two network namespaces
//! joined by 4 veth links of 1 Gbit/s each, 10.200.N.1 <-> 10.200.N.2), for
//! tests that need real links: brought up for as long as a [`TestBed`] guard
//! lives, torn down when it drops (also when the test panics).
//!
//! Without root or `ip netns` a test skips loudly (on the terminal, past the
//! test harness's capture); with `FERRY_REQUIRE_NETNS=1` (CI as root) it
//! fails instead.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

/// One test bed per test process at a time.
static BED: Mutex<()> = Mutex::new(());

/// Writes past the test harness's output capture, so a skip is seen.
pub fn loud(msg: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "\n*** {msg}\n");
}

/// True when `FERRY_REQUIRE_NETNS=1`: what a test bed test needs must be
/// there (CI, as root), so a missing piece fails the test instead of
/// skipping it.
pub fn required() -> bool {
    std::env::var("FERRY_REQUIRE_NETNS").as_deref() == Ok("1")
}

/// Skips a test whose prerequisite is missing (loudly, naming `why`), or
/// fails it with `FERRY_REQUIRE_NETNS=1`. The caller returns after this.
pub fn skip(test: &str, why: &str) {
    assert!(
        !required(),
        "{test}: required (FERRY_REQUIRE_NETNS=1) but {why}"
    );
    loud(&format!("SKIPPED {test}: {why}"));
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/netns-testbed.sh")
}

/// True when a test bed can be brought up here (root, `ip netns`); else
/// skips `test` (loudly, naming what is missing) or, with
/// `FERRY_REQUIRE_NETNS=1`, fails it.
pub fn available(test: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    match (root, netns) {
        (false, _) => skip(
            test,
            "not running as root (the namespace test bed needs it)",
        ),
        (_, false) => skip(test, "`ip netns` is not available (iproute2)"),
        _ => return true,
    }
    false
}

/// The test bed, up, for as long as the guard lives.
#[derive(Debug)]
pub struct TestBed {
    _lock: MutexGuard<'static, ()>,
    /// Source namespace (addresses 10.200.N.1 on link N).
    pub src: String,
    /// Destination namespace (addresses 10.200.N.2 on link N).
    pub dst: String,
}

impl TestBed {
    /// Brings up a bed with namespaces `src` and `dst`, or returns `None`
    /// (test skipped, reason shown) when not root or without `ip netns`.
    pub fn up(test: &str, src: &str, dst: &str) -> Option<TestBed> {
        let lock = BED.lock().unwrap_or_else(|e| e.into_inner());
        if !available(test) {
            return None;
        }
        let bed = TestBed {
            _lock: lock,
            src: src.to_string(),
            dst: dst.to_string(),
        };
        let st = bed.script_cmd("up").status().expect("run netns-testbed.sh");
        assert!(st.success(), "ci/netns-testbed.sh up failed");
        Some(bed)
    }

    fn script_cmd(&self, what: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(script())
            .arg(what)
            .env("FERRY_TESTBED_SRC", &self.src)
            .env("FERRY_TESTBED_DST", &self.dst);
        c
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let _ = self.script_cmd("down").stdout(Stdio::null()).status();
    }
}
