//! The namespace test bed of `ci/netns-testbed.sh` (two network namespaces
//! joined by 4 veth links of 1 Gbit/s each, 10.200.N.1 <-> 10.200.N.2), for
//! tests that need real links: brought up for as long as a [`TestBed`] guard
//! lives, torn down when it drops (also when the test panics).
//!
//! A bed's namespaces are named by the test (`ferry-src`, `fyop-src`...), so
//! two test processes (two `cargo test` runs, in two checkouts) would make
//! and tear down the same bed under each other. A bed therefore holds a
//! cross-process lock on each of its namespaces, [`lock_path`] (flock),
//! from before it is brought up until it is torn down: a second process
//! wanting the same bed waits (and says so) instead of failing. A script
//! that brings a bed up with `ci/netns-testbed.sh up` (a benchmark) holds
//! the same locks until its `down` or its end, so tests wait for it too.
//! The lock goes with the process that held it, however it ends.
//!
//! Without root or `ip netns` a test skips loudly (on the terminal, past the
//! test harness's capture); with `FERRY_REQUIRE_NETNS=1` (CI as root) it
//! fails instead.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use rustix::fs::{flock, FlockOperation};

/// One test bed per test process at a time.
static BED: Mutex<()> = Mutex::new(());

/// The file whose lock (flock) whoever uses network namespace `ns` holds.
pub fn lock_path(ns: &str) -> PathBuf {
    PathBuf::from(format!("/run/ferry-netns-{ns}.lock"))
}

/// Takes the lock of namespace `ns` ([`lock_path`]), waiting while another
/// process holds it (said on the terminal); held until the file is dropped.
fn lock_namespace(test: &str, ns: &str) -> File {
    let path = lock_path(ns);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{test}: cannot open {}: {e}", path.display()));
    if flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
        loud(&format!(
            "{test}: namespace {ns} is in use by another process (it holds {}): waiting",
            path.display()
        ));
        flock(&f, FlockOperation::LockExclusive)
            .unwrap_or_else(|e| panic!("{test}: cannot lock {}: {e}", path.display()));
    }
    f
}

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

/// `ci/netns-testbed.sh`, which brings a bed up and down.
pub fn script() -> PathBuf {
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
    /// Its namespaces' cross-process locks, released (dropped) only after
    /// the bed was torn down.
    _ns_locks: Vec<File>,
    /// Source namespace (addresses 10.200.N.1 on link N).
    pub src: String,
    /// Destination namespace (addresses 10.200.N.2 on link N).
    pub dst: String,
}

impl TestBed {
    /// Brings up a bed with namespaces `src` and `dst`, or returns `None`
    /// (test skipped, reason shown) when not root or without `ip netns`.
    /// Waits while another process holds a bed with either namespace.
    pub fn up(test: &str, src: &str, dst: &str) -> Option<TestBed> {
        let lock = BED.lock().unwrap_or_else(|e| e.into_inner());
        if !available(test) {
            return None;
        }
        // In name order, so two processes wanting overlapping beds cannot
        // each hold one namespace and wait for the other.
        let mut names = [src, dst];
        names.sort_unstable();
        let bed = TestBed {
            _lock: lock,
            _ns_locks: names.iter().map(|ns| lock_namespace(test, ns)).collect(),
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
            .env("FERRY_TESTBED_DST", &self.dst)
            // This process holds the bed's locks: the script must not wait
            // for them.
            .env("FERRY_TESTBED_LOCKED", "1");
        c
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let _ = self.script_cmd("down").stdout(Stdio::null()).status();
    }
}
