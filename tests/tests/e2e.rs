//! End to end: real `ferry` processes migrating a dirtying guest over loopback.

use std::time::Duration;

use ferry_tests::{key_file, listen, migrate_ok, send, summary, Migrated, Proc, KEY};

#[test]
fn listen_and_send_in_two_processes_commit_with_verified_digest() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let json = dir.path().join("summary.json");
    let Migrated { src, dest, .. } = migrate_ok(
        &key,
        &[],
        &[
            "--memory",
            "96MiB",
            "--dirty-rate",
            "16MB/s",
            "--json",
            json.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let s = summary(&json);
    assert_eq!(s["digest_verified"], true);
    assert_eq!(s["memory_bytes"], 96 << 20);
    let digest = s["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 32);
    assert!(
        dest.stdout.contains(digest),
        "destination prints the same digest: {}",
        dest.all()
    );
    assert!(
        dest.stdout.contains("0 image pages") || dest.stdout.contains("pattern pages verified"),
        "{}",
        dest.all()
    );
    assert!(s["downtime_ms"].as_f64().unwrap() > 0.0);
    let rounds = s["rounds"].as_array().unwrap();
    assert!(
        rounds.len() >= 2,
        "at least one pre-copy round and the final copy"
    );
    let sent: u64 = rounds.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert_eq!(sent, s["payload_bytes"].as_u64().unwrap());
    // Zero pages never travel as data: 25 % of the synthetic guest is zero.
    assert!(
        rounds[0]["bytes"].as_u64().unwrap() < (96 << 20) * 9 / 10,
        "{rounds:?}"
    );
    assert!(s["bytes_on_wire"].as_u64().unwrap() >= sent);
    assert!(
        src.stdout.contains("verified on both sides"),
        "{}",
        src.all()
    );
    // CPU accounting: the process's time over the migration, the guest
    // worker's left out, per GiB of page bytes sent; both sides print it.
    let cpu = &s["cpu"];
    let f = |k: &str| cpu[k].as_f64().unwrap_or_else(|| panic!("cpu.{k}: {cpu}"));
    assert!(f("ferry_s") > 0.0, "{cpu}");
    assert!(f("guest_s") >= 0.0, "{cpu}");
    assert!(
        (f("user_s") + f("system_s") - f("guest_s") - f("ferry_s")).abs() < 1e-6,
        "{cpu}"
    );
    let gib = s["payload_bytes"].as_f64().unwrap() / f64::from(1u32 << 30);
    assert!(
        (f("ferry_s_per_gib") - f("ferry_s") / gib).abs() < 1e-6,
        "{cpu}"
    );
    // Its parts: the source's audit after the commit (its workers' CPU
    // time), and populating fresh memory where pages land (the
    // destination's only: its summary line names it).
    assert!(f("audit_s") > 0.0 && f("audit_s") <= f("ferry_s"), "{cpu}");
    assert_eq!(f("first_touch_s"), 0.0, "{cpu}");
    assert!(src.stdout.contains("CPU (this side"), "{}", src.all());
    assert!(dest.stdout.contains("s/GiB"), "{}", dest.all());
    assert!(
        dest.stdout.contains("of it populating fresh memory"),
        "{}",
        dest.all()
    );
}

#[test]
fn demo_runs_with_its_defaults_shrunk_for_the_test() {
    let out = Proc::start(&["demo", "--memory", "128MiB"]).wait(Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.all());
    assert!(out.stdout.contains("migration committed"), "{}", out.all());
    assert!(out.stdout.contains("downtime"), "{}", out.all());
    assert!(
        out.stdout.contains("pattern pages verified"),
        "{}",
        out.all()
    );
}

#[test]
fn guest_image_content_is_migrated_and_digest_checked() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "key", KEY);
    let img = dir.path().join("guest.img");
    let mut bytes = Vec::new();
    for i in 0..(3u32 << 20) / 4 {
        bytes.extend_from_slice(&(i.wrapping_mul(2654435761)).to_le_bytes());
    }
    std::fs::write(&img, &bytes).unwrap();
    let (dest, addr) = listen(&key, &[]);
    let src = send(
        addr,
        &key,
        &[
            "--memory",
            "8MiB",
            "--dirty-rate",
            "0",
            "--guest-image",
            img.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let dest = dest.wait(Duration::from_secs(30));
    assert!(src.status.success(), "{}", src.all());
    assert!(
        dest.stdout.contains("768 image pages"),
        "3 MiB of image = 768 pages: {}",
        dest.all()
    );
}
