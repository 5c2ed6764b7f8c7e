//! A real Linux guest, running, migrated by QEMU itself over the namespace
//! test bed (`ci/netns-testbed.sh`: 4 links of 1 Gbit/s): the harness the
//! relay (`ferry relay`, issue 13) is tested with, working today on the
//! direct path (QEMU to QEMU over one link).
//!
//! One boot serves every case (a TCG boot takes 10-20 s): the guest hops
//! from namespace to namespace, and each hop is a case:
//!
//! 1. one migration connection: the destination's RAM equals the source's
//!    (`pmemsave` of both, paused), and once resumed the guest runs on and
//!    its own memory check (memcheck's `pass K OK`) keeps passing, its pass
//!    count continuing the source's;
//! 2. the same with QEMU multifd, 4 channels (5 connections to one address);
//! 3. the destination dies mid-migration: QEMU on the source reports a failed
//!    migration and the guest runs on there, its check passing.
//!
//! [`Route`] says how QEMU's connections travel; through `ferry relay` over
//! all four links the same guest then hops on:
//!
//! 4. one connection through the relay (RAM equal, runs on, check passing);
//! 5. multifd 4 through the relay;
//! 6. a link taken down mid-migration (its channel fails over, completes);
//! 7. the destination `ferry listen` killed mid-migration: QEMU reports a
//!    failed migration, the guest runs on at the source, the relay exits 1;
//! 8. a `--deliver-to` outside `--relay-allow` refused before it is ready.
//!
//! Needs root, `ip netns`, QEMU, python3 and what `ci/qemu/build-guest.sh`
//! builds the guest from (all installed by `ci/softroce/install.sh`); skips
//! loudly without them, fails instead with `FERRY_REQUIRE_NETNS=1` (CI).

use std::time::{Duration, Instant};

use ferry_tests::netns::{skip, TestBed};
use ferry_tests::qemu::{missing_prerequisite, QemuDriver};
use ferry_tests::Proc;
use serde_json::{json, Value};

/// The bed's namespaces: not the multichannel tests' (`ferry-src`,
/// `ferry-dst`), so the two never tear down each other's bed.
const SRC_NS: &str = "fq-src";
const DST_NS: &str = "fq-dst";
/// memcheck's area: small enough that QEMU 7.2's per-page dirty sync (which
/// the guest's odd RAM size selects, see ci/qemu/driver.py) stays cheap.
const MEMCHECK_MIB: u64 = 64;

/// A guest: the QEMU's name in the driver and the namespace it runs in.
#[derive(Debug, Clone)]
struct Guest {
    name: String,
    ns: &'static str,
}

/// How QEMU's migration connections get from the source to the destination.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// Straight from QEMU to QEMU over test bed link N (10.200.N.0/24).
    Direct { link: u8 },
    /// Through `ferry relay` (in the source's namespace, listening on
    /// loopback port + 100) to the destination namespace's `ferry listen`
    /// over all four links, delivered to the destination QEMU on loopback.
    Relay,
}

impl Route {
    /// (where the destination QEMU listens, where the source QEMU connects).
    fn uris(self, to_ns: &str, port: u16) -> (String, String) {
        match self {
            Route::Direct { link } => {
                let host = if to_ns == DST_NS { 2 } else { 1 };
                let uri = format!("tcp:10.200.{link}.{host}:{port}");
                (uri.clone(), uri)
            }
            Route::Relay => (
                format!("tcp:127.0.0.1:{port}"),
                format!("tcp:127.0.0.1:{}", port + 100),
            ),
        }
    }
}

/// The key both ends of the relay use.
static KEY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The address of `ns`'s `ferry listen` as the other namespace sees it (link 0).
fn daemon_addr(ns: &str) -> String {
    format!("10.200.0.{}:6600", if ns == DST_NS { 2 } else { 1 })
}

/// Starts `ferry listen` in `ns` (every link, loopback deliveries only).
fn start_daemon(ns: &'static str) -> Proc {
    let key = KEY.get().expect("key").to_str().unwrap().to_string();
    let p = Proc::start_in_netns(
        ns,
        &[
            "listen",
            "--listen",
            "0.0.0.0:6600",
            "--auth-key-file",
            &key,
            "--peer-timeout",
            "10s",
        ],
    );
    p.wait_for_output("listening on", Duration::from_secs(30));
    p
}

/// Starts `ferry relay` in `from_ns` toward `to_ns`'s daemon for a hop on
/// `port`, and waits until it is ready.
fn start_relay(from_ns: &'static str, to_ns: &'static str, port: u16, extra: &[&str]) -> Proc {
    let key = KEY.get().expect("key").to_str().unwrap().to_string();
    let listen = format!("127.0.0.1:{}", port + 100);
    let deliver = format!("127.0.0.1:{port}");
    let to = daemon_addr(to_ns);
    let mut args = vec![
        "relay",
        "--listen",
        &listen,
        "--to",
        &to,
        "--deliver-to",
        &deliver,
        "--auth-key-file",
        &key,
        "--performance-option",
        "tcp",
        "--channel-timeout",
        "2s",
    ];
    args.extend_from_slice(extra);
    let p = Proc::start_in_netns(from_ns, &args);
    p.wait_for_output("relay: ready", Duration::from_secs(30));
    p
}

fn other(ns: &'static str) -> &'static str {
    if ns == SRC_NS {
        DST_NS
    } else {
        SRC_NS
    }
}

/// The pass numbers memcheck printed so far, and whether any was BAD.
fn passes(d: &mut QemuDriver, g: &Guest) -> Vec<(u64, String)> {
    d.ok("passes", json!({ "name": g.name }))
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_str().unwrap().to_string()))
        .collect()
}

fn assert_all_ok(what: &str, p: &[(u64, String)], serial: &str) {
    assert!(
        p.iter().all(|(_, s)| s == "OK"),
        "{what}: memcheck reported BAD: {p:?}\nserial:\n{serial}"
    );
}

/// Waits for `count` new OK passes on `g` (numbered above `after`).
fn runs_on(d: &mut QemuDriver, g: &Guest, after: u64, count: u64) -> Vec<(u64, String)> {
    let got = d.ok(
        "wait_passes",
        json!({ "name": g.name, "count": count, "timeout": 120, "after": after }),
    );
    let p: Vec<(u64, String)> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_str().unwrap().to_string()))
        .collect();
    let serial = d.ok("serial", json!({ "name": g.name }));
    assert_all_ok(&g.name, &p, serial.as_str().unwrap_or(""));
    assert_eq!(
        d.ok("status", json!({ "name": g.name })),
        "running",
        "{} runs",
        g.name
    );
    p
}

/// Starts the destination QEMU of a hop, paused (`-S`: it stays paused after
/// the migration, for the RAM comparison), listening where `route` says.
fn start_destination(
    d: &mut QemuDriver,
    name: &str,
    ns: &'static str,
    route: Route,
    port: u16,
    multifd: u32,
    from: &Guest,
) -> (Guest, String) {
    let to = Guest {
        name: name.into(),
        ns,
    };
    d.ok(
        "start",
        json!({ "name": name, "netns": ns, "memcheck": { "mib": MEMCHECK_MIB },
                "incoming": true, "paused": true }),
    );
    let (incoming, uri) = route.uris(ns, port);
    for g in [from, &to] {
        d.ok(
            "set_migration",
            json!({ "name": g.name, "multifd": multifd }),
        );
    }
    d.ok("incoming", json!({ "name": name, "uri": incoming }));
    (to, uri)
}

/// One completed hop: the RAMs compare equal, the guest runs on at the
/// destination with its check passing. Returns the new guest.
fn hop(
    d: &mut QemuDriver,
    from: &Guest,
    name: &str,
    route: Route,
    port: u16,
    multifd: u32,
) -> Guest {
    hop_with(d, from, name, route, port, multifd, |_, _| {})
}

/// [`hop`], with `during` run once the migration started.
fn hop_with(
    d: &mut QemuDriver,
    from: &Guest,
    name: &str,
    route: Route,
    port: u16,
    multifd: u32,
    during: impl FnOnce(&mut QemuDriver, &Guest),
) -> Guest {
    let t = Instant::now();
    let (to, uri) = start_destination(d, name, other(from.ns), route, port, multifd, from);
    let relay =
        matches!(route, Route::Relay).then(|| start_relay(from.ns, other(from.ns), port, &[]));
    d.ok("migrate", json!({ "name": from.name, "uri": uri }));
    during(d, from);
    let m = d.ok(
        "wait_migration",
        json!({ "name": from.name, "timeout": 300 }),
    );
    assert_eq!(m["status"], "completed", "{name}: {m}");
    if let Some(r) = relay {
        let out = r.wait(Duration::from_secs(60));
        assert!(out.status.success(), "{name}: the relay: {}", out.all());
        eprintln!("{name}: {}", out.stdout.trim());
    }
    if multifd > 0 {
        assert!(
            m["multifd_bytes"].as_u64().unwrap() > 16 << 20,
            "{name}: pages went over the multifd channels: {m}"
        );
    }
    let migrated = t.elapsed();
    // The destination loads the last bytes a moment after the source is done.
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.ok("status", json!({ "name": name })) == "inmigrate" {
        assert!(Instant::now() < deadline, "{name} still loading after 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.ok("status", json!({ "name": name })), "paused");
    assert_eq!(d.ok("status", json!({ "name": from.name })), "postmigrate");
    let src_passes = passes(d, from);
    let last = src_passes.last().map(|p| p.0).unwrap_or(0);
    assert_all_ok(&from.name, &src_passes, "");

    let ram = d.ok("compare_ram", json!({ "a": from.name, "b": name }));
    assert_eq!(
        ram["equal"], true,
        "{name}: RAM differs from the source's: {ram}"
    );
    d.ok("quit", json!({ "name": from.name }));
    d.ok("cont", json!({ "name": name }));
    let p = runs_on(d, &to, 0, 2);
    // The first pass on the destination continues the source's count (a
    // line cut by the switchover can hide one number): the same guest, not a
    // new boot.
    assert!(
        last < p[0].0 && p[0].0 <= last + 2,
        "{name}: passes {p:?} do not continue the source's last pass {last}"
    );
    let serial = d.ok("serial", json!({ "name": name }));
    assert!(
        !serial.as_str().unwrap().contains("ferry-guest: init"),
        "{name}: the guest booted again: {serial}"
    );
    eprintln!(
        "{name}: {} over {route:?}, multifd {multifd}: QEMU total {} ms, downtime {} ms, \
         {} bytes; migrate {:.1} s, hop with checks {:.1} s (RAM compare {} ms)",
        from.name,
        m["total_ms"],
        m["downtime_ms"],
        m["transferred"],
        migrated.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        ram["ms"]
    );
    to
}

/// Waits until `from`'s migration has sent `bytes`; it must still be
/// running then (a case that kills something mid-migration).
fn sent_at_least(d: &mut QemuDriver, from: &Guest, name: &str, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let q = d.ok("query_migrate", json!({ "name": from.name }));
        assert!(
            q["status"] != "completed" && q["status"] != "failed",
            "{name}: migration ended before the kill: {q}"
        );
        if q["ram"]["transferred"].as_u64().unwrap_or(0) >= bytes {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: no progress: {q}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The destination QEMU is killed once `kill_after` bytes went: the source
/// reports a failed migration and its guest runs on, check passing.
fn destination_dies(
    d: &mut QemuDriver,
    from: &Guest,
    name: &str,
    route: Route,
    port: u16,
    kill_after: u64,
) {
    let t = Instant::now();
    let (_to, uri) = start_destination(d, name, other(from.ns), route, port, 0, from);
    let before = passes(d, from).last().map(|p| p.0).unwrap_or(0);
    d.ok("migrate", json!({ "name": from.name, "uri": uri }));
    sent_at_least(d, from, name, kill_after);
    d.ok("kill", json!({ "name": name }));
    let m = d.ok(
        "wait_migration",
        json!({ "name": from.name, "timeout": 120 }),
    );
    assert_eq!(m["status"], "failed", "{name}: {m}");
    runs_on(d, from, before, 2);
    eprintln!(
        "{name}: destination killed after {kill_after} bytes: source says {:?}, guest runs on; \
         case {:.1} s",
        m["error"],
        t.elapsed().as_secs_f64()
    );
}

/// Through the relay, the destination `ferry listen` is killed once
/// `kill_after` bytes went: QEMU on the source reports a failed migration
/// and the guest runs on there; the relay exits 1. The daemon is restarted.
fn relay_destination_dies(
    d: &mut QemuDriver,
    daemons: &mut std::collections::HashMap<&'static str, Proc>,
    from: &Guest,
    name: &str,
    port: u16,
    kill_after: u64,
) {
    let t = Instant::now();
    let to_ns = other(from.ns);
    let (_to, uri) = start_destination(d, name, to_ns, Route::Relay, port, 0, from);
    let relay = start_relay(from.ns, to_ns, port, &[]);
    let before = passes(d, from).last().map(|p| p.0).unwrap_or(0);
    d.ok("migrate", json!({ "name": from.name, "uri": uri }));
    sent_at_least(d, from, name, kill_after);
    let daemon = daemons.remove(to_ns).expect("daemon");
    ferry_tests::sigkill(daemon.pid());
    let _ = daemon.wait(Duration::from_secs(10));
    let m = d.ok(
        "wait_migration",
        json!({ "name": from.name, "timeout": 120 }),
    );
    assert_eq!(m["status"], "failed", "{name}: {m}");
    let out = relay.wait(Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{name}: the relay: {}",
        out.all()
    );
    assert!(!out.panicked(), "{}", out.all());
    runs_on(d, from, before, 2);
    d.ok("kill", json!({ "name": name }));
    daemons.insert(to_ns, start_daemon(to_ns));
    eprintln!(
        "{name}: destination ferry killed after {kill_after} bytes: source QEMU says {:?}, guest runs on; case {:.1} s",
        m["error"],
        t.elapsed().as_secs_f64()
    );
}

/// A `--deliver-to` outside the destination's `--relay-allow` (loopback by
/// default) is refused before the relay is ready: nothing to migrate to.
fn relay_refuses_a_remote_deliver_to(from: &Guest) {
    let key = KEY.get().unwrap().to_str().unwrap().to_string();
    let to_ns = other(from.ns);
    let host = if to_ns == DST_NS { 2 } else { 1 };
    let deliver = format!("10.200.1.{host}:4499");
    let to = daemon_addr(to_ns);
    let p = Proc::start_in_netns(
        from.ns,
        &[
            "relay",
            "--listen",
            "127.0.0.1:4599",
            "--to",
            &to,
            "--deliver-to",
            &deliver,
            "--auth-key-file",
            &key,
        ],
    );
    let out = p.wait(Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("relay destination not allowed") && out.stderr.contains(&deliver),
        "{}",
        out.all()
    );
    assert!(!out.stdout.contains("ready"), "{}", out.all());
}

#[test]
fn a_running_guest_migrated_by_qemu_over_the_bed_runs_on_with_its_memory_intact() {
    let test = "a_running_guest_migrated_by_qemu_over_the_bed_runs_on_with_its_memory_intact";
    if let Some(why) = missing_prerequisite() {
        skip(test, &format!("{why}; the real-guest tests need QEMU"));
        return;
    }
    let Some(_bed) = TestBed::up(test, SRC_NS, DST_NS) else {
        return;
    };
    // Short path: QMP sockets live here (unix socket paths are short).
    let work = tempfile::Builder::new()
        .prefix("fq")
        .tempdir_in("/tmp")
        .unwrap();
    let mut d = QemuDriver::start(work.path());
    let built = d.elapsed();

    let g0 = Guest {
        name: "g0".into(),
        ns: SRC_NS,
    };
    d.ok(
        "start",
        json!({ "name": "g0", "netns": SRC_NS, "memcheck": { "mib": MEMCHECK_MIB } }),
    );
    let booted = runs_on(&mut d, &g0, 0, 2);
    let boot = d.elapsed();
    eprintln!(
        "guest built in {built:.1} s, booted to pass {} in {:.1} s",
        booted[1].0,
        boot - built
    );

    // 1. One connection, link 0, namespace fq-src -> fq-dst.
    let g1 = hop(&mut d, &g0, "g1", Route::Direct { link: 0 }, 4401, 0);
    // 2. Multifd with 4 channels, link 1, back fq-dst -> fq-src.
    let g2 = hop(&mut d, &g1, "g2", Route::Direct { link: 1 }, 4402, 4);
    // 3. The destination dies after 32 MiB: the guest stays on fq-src.
    destination_dies(&mut d, &g2, "g3", Route::Direct { link: 2 }, 4403, 32 << 20);

    // Through `ferry relay` over all four links.
    let dir = tempfile::tempdir().unwrap();
    KEY.get_or_init(|| {
        ferry_tests::key_file(dir.path(), "key", b"0123456789abcdef0123456789abcdef")
    });
    let mut daemons = std::collections::HashMap::new();
    for ns in [SRC_NS, DST_NS] {
        daemons.insert(ns, start_daemon(ns));
    }
    let relay_start = d.elapsed();
    // 4. One connection through the relay, fq-src -> fq-dst.
    let g4 = hop(&mut d, &g2, "g4", Route::Relay, 4404, 0);
    // 5. Multifd 4 through the relay, back fq-dst -> fq-src.
    let g5 = hop(&mut d, &g4, "g5", Route::Relay, 4405, 4);
    // 6. A link (not the control connection's) taken down mid-migration:
    //    its channel fails over, the migration completes.
    let g6 = hop_with(&mut d, &g5, "g6", Route::Relay, 4406, 0, |d, from| {
        sent_at_least(d, from, "g6", 64 << 20);
        let dev = if from.ns == SRC_NS { "fsrc2" } else { "fdst2" };
        let st = std::process::Command::new("ip")
            .args(["-n", from.ns, "link", "set", dev, "down"])
            .status()
            .unwrap();
        assert!(st.success());
        eprintln!("g6: {dev} down in {}", from.ns);
    });
    let dev = if g5.ns == SRC_NS { "fsrc2" } else { "fdst2" };
    let _ = std::process::Command::new("ip")
        .args(["-n", g5.ns, "link", "set", dev, "up"])
        .status();
    // 7. The destination `ferry listen` killed mid-migration.
    relay_destination_dies(&mut d, &mut daemons, &g6, "g7", 4407, 32 << 20);
    // 8. A --deliver-to outside --relay-allow, refused.
    relay_refuses_a_remote_deliver_to(&g6);
    eprintln!(
        "relay cases: {:.1} s; all cases: {:.1} s",
        d.elapsed() - relay_start,
        d.elapsed()
    );
    for (_, p) in daemons {
        let _ = p.kill();
    }
    let _: Value = d.ok("quit", json!({ "name": g6.name }));
}

/// The guest's check can fail: memcheck, run natively on the host, reports
/// a bit flipped after pass 2's rewrite as `pass 2 BAD` and exits 1; left
/// alone it passes every pass and exits 0.
#[test]
fn memcheck_reports_a_flipped_bit_and_passes_otherwise() {
    let test = "memcheck_reports_a_flipped_bit_and_passes_otherwise";
    if let Some(why) = missing_prerequisite() {
        skip(test, &format!("{why}; memcheck is built with the guest"));
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/qemu/build-guest.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-guest.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let memcheck = text
        .lines()
        .find_map(|l| l.strip_prefix("MEMCHECK="))
        .expect("build-guest.sh names memcheck");
    let run = |extra: &[&str]| {
        let o = std::process::Command::new(memcheck)
            .args([
                "--mib",
                "8",
                "--slice-mib",
                "1",
                "--period-ms",
                "0",
                "--passes",
                "3",
            ])
            .args(extra)
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8(o.stdout).unwrap())
    };
    let (code, out) = run(&[]);
    assert_eq!(code, Some(0), "{out}");
    for k in 1..=3 {
        assert!(out.contains(&format!("pass {k} OK ")), "{out}");
    }
    let (code, out) = run(&["--corrupt-at", "2"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("pass 1 OK ") && out.contains("pass 2 BAD bad_pages=1 "),
        "{out}"
    );
    // Re-baselined: pass 3 reports only new damage.
    assert!(out.contains("pass 3 OK "), "{out}");
    let (code, out) = run(&["--mib", "0"]);
    assert_eq!(code, Some(2), "{out}");
}
